"""What a training run leaves behind, against references that do not come from the code under test.

- retention: the step directories under `checkpoints/` equal the set worked out here from the rule
  that config.py documents (`keep_checkpoints` newest saves plus every saved multiple of
  `keep_every`; a save every `checkpoint_every` steps and at the last step);
- `profile_steps=(first, count)`: a `jax.profiler` trace under `workdir/profile/` that holds
  exactly steps first + 1 .. first + count (each step marked here by a TraceAnnotation of our own,
  read back with `jax.profiler.ProfileData`); a run without it writes none;
- `init_from`: run B's first logged loss equals a float64 numpy cross-entropy of run A's last
  checkpointed params (read with orbax directly) on B's first batch (from a pipeline of our own);
  B's optimizer and schedule start fresh: counts 1 after its step 1, Adam moments that are exactly
  one gradient's, and (lr 0 at count 0) params after step 1 bit for bit A's;
- the learning rate an update applied, measured from the checkpoints: embedding rows of ids that
  no batch so far held have an exactly-zero gradient and zero Adam moments, so the update there is
  pure decoupled weight decay, p_new = p_old * (1 - lr * weight_decay); that lr equals the logged
  `lr` and the warmup + cosine formula at s - 1 (step s applies the optimizer's count s - 1);
- `generate --step`: the CLI's greedy ids and log-probabilities equal an argmax decode that
  recomputes the model over the whole growing sequence with that step's params, and not with
  another step's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_reference import _expected_mask, _first_rows, _hand_lr
from train_fixtures import REPO, tiny_config, tiny_shards

import polyglot_jax.train as trainer
from polyglot_jax.data.pipeline import make_pipeline
from polyglot_jax.model import GPTNeoX, ModelConfig, init_params
from polyglot_jax.train import train

# Large, so that the decay of a row (lr * WD * p) stands well above float32 rounding of p.
WD = 1.0
MARK = "test_train_outputs_step_"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps_on_disk(workdir: pathlib.Path) -> set[int]:
    return {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


def _restore(workdir: pathlib.Path, step: int, item: str):
    """One item of one checkpoint with plain orbax (no polyglot_jax code), as numpy arrays."""
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(workdir / "checkpoints" / str(step) / item)
    return jax.tree.map(np.asarray, tree)


def _adam(opt_state) -> dict:
    """{count, mu, nu} of a saved optimizer state: [clip's, [adam's, decay mask's, schedule's]]."""
    adam, schedule = opt_state[1][0], opt_state[1][-1]
    assert set(adam) == {"count", "mu", "nu"} and int(adam["count"]) == int(schedule["count"])
    return adam


def _model_cfg(config) -> ModelConfig:
    return ModelConfig.from_config(config.model)


# ---------------------------------------------------------------- the runs (shared)


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory):
    """4 steps (warmup 2), a checkpoint after every step and all of them kept, large decay."""
    workdir = tmp_path_factory.mktemp("a")
    config = tiny_config(
        shards,
        train__steps=4,
        train__checkpoint_every=1,
        train__keep_checkpoints=4,
        train__weight_decay=WD,
    )
    train(config, workdir)
    return config, workdir


RETAIN = dict(steps=11, checkpoint_every=2, keep_checkpoints=2, keep_every=6)
PROFILE = (4, 2)  # traces steps 5 and 6


@pytest.fixture(scope="module")
def run_r(shards, tmp_path_factory):
    """11 steps saving every 2nd, keeping 2 + every 6th, profiling 2 steps; every step's work is
    wrapped in a TraceAnnotation naming its step, so the trace says which steps it holds."""
    workdir = tmp_path_factory.mktemp("r")
    config = tiny_config(
        shards,
        **{f"train__{k}": v for k, v in RETAIN.items()},
        train__profile_steps=PROFILE,
    )
    real, done = trainer._train_step, [0]

    def marked(fns, state, local):
        done[0] += 1  # a fresh workdir: the n-th call is step n
        with jax.profiler.TraceAnnotation(f"{MARK}{done[0]}"):
            return real(fns, state, local)  # the dispatch (the loop syncs around the trace)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_train_step", marked)
        train(config, workdir)
    assert done[0] == RETAIN["steps"]
    return config, workdir


# ---------------------------------------------------------------- 1. retention


def _kept(steps: int, checkpoint_every: int, keep_checkpoints: int, keep_every: int) -> set[int]:
    """config.py: "the newest K checkpoints are kept... plus every M-th step for good (0: none)";
    a save every `checkpoint_every` steps and "the last step always saves"."""
    saved = sorted(set(range(checkpoint_every, steps + 1, checkpoint_every)) | {steps})
    periodic = {s for s in saved if keep_every and s % keep_every == 0}
    return set(saved[-keep_checkpoints:]) | periodic


def test_kept_checkpoints_are_the_newest_k_plus_every_mth(run_r):
    _, workdir = run_r
    want = _kept(**RETAIN)
    assert want == {6, 10, 11}
    # The values tell the rule from its likely mistakes: keep_every ignored, K off by one,
    # "every M-th save" instead of "every M-th step", the last step not saved.
    assert want != _kept(**{**RETAIN, "keep_every": 0})
    assert want != _kept(**{**RETAIN, "keep_checkpoints": 1})
    assert want != _kept(**{**RETAIN, "keep_checkpoints": 3})
    saved = [2, 4, 6, 8, 10, 11]
    assert want != set(saved[-2:]) | {s for i, s in enumerate(saved, 1) if i % 6 == 0}
    assert want != set(saved[-2:]) | {s for s in saved if (s + 1) % 6 == 0}
    assert want != _kept(**{**RETAIN, "steps": 10})  # the saves of a run without its last step
    assert _steps_on_disk(workdir) == want


# ---------------------------------------------------------------- 2. profile_steps


def _trace_files(workdir: pathlib.Path) -> list[pathlib.Path]:
    root = workdir / "profile"
    return sorted(root.rglob("*.xplane.pb")) if root.exists() else []


def test_profile_steps_traces_exactly_the_requested_steps(run_r, run_a):
    _, workdir = run_r
    (trace,) = _trace_files(workdir)
    assert trace.stat().st_size > 0
    assert sorted((workdir / "profile").rglob("*.trace.json.gz"))  # what TensorBoard shows
    data = jax.profiler.ProfileData.from_file(str(trace))
    marks = [
        int(event.name[len(MARK) :])
        for plane in data.planes
        for line in plane.lines
        for event in line.events
        if event.name.startswith(MARK)
    ]
    first, count = PROFILE
    assert sorted(marks) == list(range(first + 1, first + count + 1))
    # The run without profile_steps (the default (0, 0)) traced nothing.
    assert tuple(run_a[0].train.profile_steps) == (0, 0)
    assert _trace_files(run_a[1]) == [] and not (run_a[1] / "profile").exists()


# ---------------------------------------------------------------- 3. init_from


def _nll64(model_cfg: ModelConfig, params, rows) -> float:
    """Mean next-token NLL of `params` on `rows`, the softmax in float64 numpy."""
    tokens = rows["tokens"]
    logits = GPTNeoX(model_cfg).apply({"params": params}, tokens[:, :-1])
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    mask = _expected_mask(rows)
    return float((nll * mask).sum() / mask.sum())


def test_init_from_starts_from_the_source_params_with_a_fresh_optimizer(shards, run_a, tmp_path):
    config_a, workdir_a = run_a
    last_a = max(_steps_on_disk(workdir_a))
    config_b = tiny_config(
        shards,
        train__steps=1,
        train__weight_decay=WD,
        train__init_from=str(workdir_a),
    )
    train(config_b, tmp_path)
    records = _records(tmp_path)
    # B counts its own steps from 1 and logs its own schedule from 0.
    assert [(r["step"], r["lr"]) for r in records] == [(1, _hand_lr(config_b.train, 0))]
    assert _steps_on_disk(tmp_path) == {1}

    # B's step-1 loss is that of A's last params on B's first batch, not of a fresh init.
    params_a = _restore(workdir_a, last_a, "params")
    rows = _first_rows(config_b)
    want = _nll64(_model_cfg(config_a), params_a, rows)
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)
    init_loss = _records(workdir_a)[0]["loss"]  # A's step 1 ran on the same batch, from init
    assert abs(want - init_loss) > 1e-2  # so the check above can tell the two apart

    # Fresh optimizer: after B's step 1 the counts are 1 (A's last are `last_a`)...
    assert int(_adam(_restore(workdir_a, last_a, "opt_state"))["count"]) == last_a
    adam_b = _adam(_restore(tmp_path, 1, "opt_state"))
    assert int(adam_b["count"]) == 1
    # ...the moments are one gradient's, mu = (1 - b1) g and nu = (1 - b2) g^2, whatever g is...
    t = config_b.train
    for mu, nu in zip(jax.tree.leaves(adam_b["mu"]), jax.tree.leaves(adam_b["nu"]), strict=True):
        some = nu > 1e-30
        assert some.any()
        np.testing.assert_allclose(
            mu[some].astype(np.float64) ** 2 / nu[some], (1 - t.b1) ** 2 / (1 - t.b2), rtol=1e-4
        )
    # ...and step 1 applied lr(0) = 0, so B's params after it are A's, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, _restore(tmp_path, 1, "params"), params_a)


# ---------------------------------------------------------------- 4. the applied learning rate


def _ids_seen(config, steps: int) -> list[set[int]]:
    """Token ids in the first 1..`steps` batches (cumulative), from a pipeline of our own."""
    it = make_pipeline(
        config.data,
        seq_len=config.train.seq_len,
        global_batch_size=config.train.batch_size,
        process_index=0,
        process_count=1,
    )
    seen, out = set(), []
    for _ in range(steps):
        seen |= set(np.unique(np.asarray(next(it).batch.tokens)).tolist())
        out.append(set(seen))
    return out


def test_logged_lr_is_the_lr_the_update_applied(run_a):
    config, workdir = run_a
    t = config.train
    model_cfg = _model_cfg(config)
    logged = {r["step"]: r["lr"] for r in _records(workdir)}
    assert sorted(logged) == list(range(1, t.steps + 1))
    seen = _ids_seen(config, t.steps)
    # The trainer's initial params: the same init, jitted (eager rounds the embeddings otherwise).
    init = jax.jit(lambda: nn.meta.unbox(init_params(model_cfg, jax.random.key(t.seed))))
    before = np.asarray(init()["embed_in"])
    for step in range(1, t.steps + 1):
        after = _restore(workdir, step, "params")["embed_in"]
        adam = _adam(_restore(workdir, step, "opt_state"))
        unused = np.array(sorted(set(range(model_cfg.vocab_size)) - seen[step - 1]))
        assert len(unused) > model_cfg.vocab_size // 2
        # No batch so far held these ids: zero gradient, zero moments, so the Adam term is 0.
        assert not adam["mu"]["embed_in"][unused].any()
        assert not adam["nu"]["embed_in"][unused].any()
        p_old = before[unused].astype(np.float64)
        p_new = after[unused].astype(np.float64)
        applied = float(((p_old - p_new) * p_old).sum() / (WD * (p_old**2).sum()))
        # Nothing but the decay: every element shrank by the same factor.
        np.testing.assert_allclose(p_new, p_old * (1 - applied * WD), rtol=1e-6, atol=1e-12)
        assert applied == pytest.approx(logged[step], rel=1e-4, abs=1e-9), step
        assert applied == pytest.approx(_hand_lr(t, step - 1), rel=1e-4, abs=1e-9), step
        if _hand_lr(t, step) != _hand_lr(t, step - 1):
            assert applied != pytest.approx(_hand_lr(t, step), rel=1e-2, abs=1e-9), step
        before = after
    assert logged[1] == 0.0 and logged[3] == pytest.approx(t.lr)  # the warmup happened


# ---------------------------------------------------------------- 5. generate --step


def _greedy(logits_of, params, prompt: list[int], n: int, eos: int):
    """Argmax decoding that reruns the model over the whole sequence for every new token (in a
    row of fixed length, zeros after the sequence: causal attention never reads them)."""
    row = np.zeros(len(prompt) + n, np.int32)
    row[: len(prompt)] = prompt
    length, ids, logprobs = len(prompt), [], []
    for _ in range(n):
        z = np.asarray(logits_of({"params": params}, row[None])[0, length - 1], np.float64)
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        token = int(np.argmax(z))
        ids.append(token)
        logprobs.append(float(logp[token]))
        row[length] = token
        length += 1
        if token == eos:
            break
    return ids, logprobs


def test_generate_step_decodes_with_that_steps_params(run_a):
    config, workdir = run_a
    manifest = json.loads((pathlib.Path(config.data.shards[0]) / "manifest.json").read_text())
    prompt = [int(i) for i in _first_rows(config)["tokens"][0, :6]]
    n = 8
    args = [
        "generate",
        f"--workdir={workdir}",
        "--step=2",
        f"--prompt_ids={','.join(map(str, prompt))}",
        f"--max_new_tokens={n}",
        "--greedy",
        "--json",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)

    logits_of = jax.jit(GPTNeoX(_model_cfg(config)).apply)
    eos = manifest["eos_id"]
    ref = {s: _greedy(logits_of, _restore(workdir, s, "params"), prompt, n, eos) for s in (2, 4)}
    # Step 2's and step 4's decodes differ, so matching one of them says which params were used.
    assert ref[2][0] != ref[4][0] or not np.allclose(ref[2][1], ref[4][1], atol=1e-3)
    assert got["ids"] == ref[2][0]
    np.testing.assert_allclose(got["logprobs"], ref[2][1], atol=1e-4)
