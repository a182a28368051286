"""The ghostpen server: gRPC service, sessions, engines, metrics and the CLI."""
