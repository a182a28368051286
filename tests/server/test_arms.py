"""Which completer serves whom: the running experiment's arms over the promoted default, each
job stamped with its arm; an experiment this server cannot serve stays off it. The engine is
never called here: the test is about the choice of completer."""

from __future__ import annotations

import time

from ghostpen.context.postprocess import Mode
from ghostpen.context.prompt import Document
from ghostpen.context.template import load_template
from ghostpen.server.arms import Traffic
from ghostpen.server.completion import OUTSIDE, Assignment, Completer, Discard, RequestSpec
from ghostpen.server.experiments import Arm, Experiment
from ghostpen.server.identity import LOCAL, Identity
from ghostpen.server.settings import Settings

ADAPTERS = {"shop-lora": "/models/shop.gguf"}
FIM = "qwen25-coder-repo-fim"
FIM_ID = load_template(FIM).template_id
TEMPLATES = {FIM: load_template(FIM)}  # as the store resolved them


def traffic() -> Traffic:
    settings = Settings()
    return Traffic(Completer.from_settings(object(), settings, Discard()), ADAPTERS)  # type: ignore[arg-type]


def served_by(completer: Completer) -> tuple[str, str, int, Assignment]:
    document = Document("a.py", "python", "x = 1\n", 6)
    spec = RequestSpec("r1", Mode.AUTO, 0, "", 5.0, time.monotonic())
    prompt = completer.prompt("shop", document, ())
    job = completer.job(spec, document, prompt, Identity("ann"))
    return (
        completer.template.template_id,
        job.adapter,
        completer.context_settings.top_k,
        job.assignment,
    )


EXPERIMENT = Experiment(
    "fim", (Arm("a", 1), Arm("b", 1, FIM, "shop-lora", (("top_k", "2"),))), "running", 0, "pm"
)


def test_each_user_is_served_by_their_arm_and_each_job_says_which() -> None:
    serving = traffic()
    base = serving.default
    assert served_by(serving.completer(Identity("ann"), "s1"))[3] == OUTSIDE
    serving.load(EXPERIMENT, None, TEMPLATES)
    seen = {}
    for user in (f"user{i}" for i in range(40)):
        owner = Identity(user, tenant="acme")
        arm = EXPERIMENT.assign(f"acme/{user}")
        completer = serving.completer(owner, f"session-of-{user}")
        assert completer is serving.completer(owner, "another session")  # the user decides
        seen[arm.name] = served_by(completer)
    assert seen["a"] == (base.template.template_id, "", base.context_settings.top_k,
                         Assignment("fim", "a"))  # fmt: skip
    assert seen["b"] == (FIM_ID, "shop-lora", 2, Assignment("fim", "b"))
    # without users (no authentication), the editor's session key decides
    keys = {f"editor{i}": EXPERIMENT.assign(f"editor{i}").name for i in range(40)}
    assert {served_by(serving.completer(LOCAL, k))[3].arm for k in keys} == {"a", "b"}
    assert all(served_by(serving.completer(LOCAL, k))[3].arm == arm for k, arm in keys.items())


def test_the_promoted_default_serves_outside_and_under_the_arms() -> None:
    serving = traffic()
    promoted = Arm("b", 1, FIM, "shop-lora", (("top_k", "2"),))
    serving.load(None, promoted, TEMPLATES)
    assert served_by(serving.completer(Identity("ann"), "s"))[:3] == (FIM_ID, "shop-lora", 2)
    assert served_by(serving.default)[3] == OUTSIDE
    budget = Experiment("budget", (Arm("a", 1), Arm("c", 1, settings=(("top_k", "6"),))),
                        "running", 0, "pm")  # fmt: skip
    serving.load(budget, promoted, TEMPLATES)
    for arm in budget.arms:
        completer = serving.completer(LOCAL, next(
            k for k in (f"k{i}" for i in range(100)) if budget.assign(k).name == arm.name
        ))  # fmt: skip
        top_k = 6 if arm.name == "c" else 2
        assert served_by(completer) == (FIM_ID, "shop-lora", top_k, Assignment("budget", arm.name))


def test_an_experiment_this_server_cannot_serve_stays_off_it(caplog) -> None:
    serving = traffic()
    elsewhere = Experiment("other", (Arm("a", 1), Arm("b", 1, adapter="not-here")), "running",
                           0, "pm")  # fmt: skip
    serving.load(elsewhere, None)
    assert serving.experiment is None
    assert served_by(serving.completer(Identity("ann"), "s"))[3] == OUTSIDE
    assert "'not-here' is not loaded" in caplog.text
    serving.load(None, None)
    serving.load(EXPERIMENT, None, TEMPLATES)  # and a servable one that follows is served
    assert serving.experiment == EXPERIMENT
