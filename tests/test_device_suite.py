"""bench/device_suite.sh --rehearse: the GPU suite's steps at tiny sizes on CPU, run as the GPU
machine would run them, so that nothing fails there for a reason a CPU could have caught.

The packages that machine's image lacks and the suite does not carry in bench/wheels are made
unimportable (`sys.modules[name] = None` from a sitecustomize: `import` fails and
`importlib.util.find_spec` says absent), so a GPU path that imported seqio, datatrove, lm_eval
or sklearn fails here. Every step must pass and write its record with the device and versions.
"""

import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_IMAGE = ("seqio", "tensorflow", "datatrove", "lm_eval", "sklearn")


def test_rehearsal_passes_every_step_without_the_packages_the_gpu_image_lacks(tmp_path):
    blocker = tmp_path / "absent"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in ABSENT_ON_THE_GPU_IMAGE)
    )
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHONPATH": str(blocker), "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the suite's own processes would see
    done = subprocess.run(
        ["bash", "bench/device_suite.sh", "--rehearse", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.log"))
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == [
        "device", "kernels", "train_step_xla", "attention", "generate", "train_step_pallas"
    ]  # fmt: skip
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        torch_here = True
    except ImportError:  # the 3.12 line: no CPU torch wheel here
        torch_here = False
    skipped = {"generate"} if not torch_here else set()
    assert all(s["status"] == "passed" for k, s in steps.items() if k not in skipped), steps
    assert all(steps[k]["status"] == "skipped" and steps[k]["reason"] for k in skipped)
    assert summary["rehearsal"] is True and summary["passed"] is True
    assert summary["device"]["backend"] == "cpu" and summary["device"]["jax"]

    # The blocker worked: the suite's processes could not import what the GPU image lacks.
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('sklearn'))"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr

    # The on-device kernel tests were collected and skipped, saying why (no GPU here).
    suite = ET.parse(out / "kernels.xml").getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests >= 10 and skipped == tests - 1  # all but the GPU-presence check
    assert int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0
    assert "needs a GPU" in (out / "logs" / "kernels.log").read_text()

    pallas = json.loads((out / "train_step_tiny_pallas.json").read_text())
    assert pallas["model"]["attention_impl"] == "pallas" and pallas["torch_step_time_s"] is None
    step = json.loads((out / "train_step_tiny_xla.json").read_text())
    assert step["platform"] == "cpu" and step["model"]["attention_impl"] == "xla"
    assert step["versions"]["jax"] and step["step_time_s"] > 0
    assert step["matmul_peak"]["flop_per_s"] > 0 and step["mfu_of_measured_matmul_peak"] > 0
    # transformers ran beside ours, or the record says why not (the 3.12 line has no torch)
    assert step["torch_step_time_s"] or "torch" in step["skipped"]
    attention = json.loads((out / "attention.json").read_text())
    assert {r["impl"] for r in attention["attention"]} == {"pallas", "xla"}
    if torch_here:
        assert json.loads((out / "generate.json").read_text())["batches"]


def test_only_torch_compile_failures_fall_back_to_eager():
    """bench/train_step.py times eager torch when torch.compile fails, but an error of anything
    else (our shapes, memory) must propagate: told apart by where it was raised."""
    probe = (
        "import sys; sys.argv = ['train_step']; sys.path.insert(0, 'bench')\n"
        "import train_step\n"
        "def raised(filename, error):\n"
        "    try:\n"
        "        exec(compile(f'raise {error}', filename, 'exec'))\n"
        "    except Exception as e:\n"
        "        return train_step._raised_by_torch_compile(e)\n"
        "print(raised('/site-packages/torch/_inductor/codegen.py', 'AssertionError()'),\n"
        "      raised('/site-packages/torch/_dynamo/eval_frame.py', 'RuntimeError()'),\n"
        "      raised('/site-packages/torch/nn/functional.py', 'RuntimeError()'),\n"
        "      raised('/repo/bench/train_step.py', 'AssertionError()'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "False"]
