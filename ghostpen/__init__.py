"""ghostpen: a low-latency, self-hosted code-completion server, its editor client and benchmarks.

One import namespace over the repository's folders (see setup.py): `ghostpen.server`,
`ghostpen.context`, `ghostpen.proto`, `ghostpen.editor_client`, `ghostpen.benchmarks`. This
package itself holds only the command line, the one module that may import all of them.
"""
