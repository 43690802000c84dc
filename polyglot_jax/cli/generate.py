"""Continue prompts with a trained run (--workdir) or a Hugging Face directory (--hf).

    polyglot-jax generate --hf=DIR --prompt="..." [--prompt="..."] [--max_new_tokens=64]
        [--greedy | --temperature=0.8 --top_k=50 --top_p=0.95] [--repetition_penalty=1.1]
        [--num_samples=4] [--stop=TEXT] [--dtype=bfloat16] [--batch_size=16] [--json]
        [--config.mesh.model=2]      # tensor parallelism; rows go over the data axes

Prompts come from --prompt (repeatable), --prompt_ids=1,2,3 or --prompts_file (jsonl: one object
per line with `prompt` text or `prompt_ids`). With --json, one line per prompt in input order:
{"ids", "logprobs", "text", "finish"} (and "samples", a list of such objects, when
--num_samples > 1). The mesh is `--config.mesh.*` (default: data parallel over every device).
"""

from __future__ import annotations

import json

from absl import flags

from polyglot_jax.cli import _inputs as inputs
from polyglot_jax.errors import ConfigError

_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeatable; needs a tokenizer).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "One prompt as token ids, e.g. 1,2,3.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, 'jsonl of prompts: {"prompt": "text"} or {"prompt_ids": [1, 2]} a line.'
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", 0, "No eos before this many new tokens.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Take the most likely token (else sample).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of mass >= top_p.")
_REPETITION = flags.DEFINE_float(
    "repetition_penalty", 1.0, "HF's penalty on tokens already present (1: none)."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_STOP = flags.DEFINE_multi_string("stop", None, "Text that ends a completion (repeatable).")
_EOS_ID = flags.DEFINE_integer(
    "eos_id", None, "End-of-text id (default: the tokenizer's; -1: none)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows decoded together.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per prompt.")


def _sampling(eos_id: int | None, stop: tuple[tuple[int, ...], ...] = ()):
    from polyglot_jax.generate import Sampling

    return Sampling(
        max_new_tokens=_MAX_NEW.value,
        min_new_tokens=_MIN_NEW.value,
        greedy=_GREEDY.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        repetition_penalty=_REPETITION.value,
        num_samples=_NUM_SAMPLES.value,
        seed=_SEED.value,
        eos_id=eos_id,
        stop=stop,
    )


def _check_flags() -> None:
    """Every flag, before any model is loaded: one ConfigError naming the flag."""
    inputs.check()
    sources = [_PROMPT.value, _PROMPT_IDS.value, _PROMPTS_FILE.value]
    if sum(s is not None for s in sources) != 1:
        raise ConfigError("give exactly one of --prompt, --prompt_ids and --prompts_file")
    if _BATCH.value < 1:
        raise ConfigError(f"--batch_size={_BATCH.value} must be a positive int")
    if _EOS_ID.value is not None and _EOS_ID.value < -1:
        raise ConfigError(f"--eos_id={_EOS_ID.value} must be an id, or -1 for none")
    try:
        _sampling(None).check(vocab_size=2**31 - 1)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None


def _prompt_ids_flag() -> list[int]:
    try:
        return [int(i) for i in _PROMPT_IDS.value]
    except ValueError:
        raise ConfigError(f"--prompt_ids={','.join(_PROMPT_IDS.value)} must be integers") from None


def main(argv: list[str]) -> None:
    from polyglot_jax.generate import Generator

    _check_flags()
    if _PROMPTS_FILE.value is not None:
        prompts = inputs.read_prompts_file(_PROMPTS_FILE.value)
    elif _PROMPT_IDS.value is not None:
        prompts = [_prompt_ids_flag()]
    else:
        prompts = list(_PROMPT.value)
    cfg, params, tokenizer, mesh, rules = inputs.load()
    if tokenizer is None and (any(isinstance(p, str) for p in prompts) or _STOP.value):
        what = "--stop" if _STOP.value else "text prompts"
        raise ConfigError(f"this model has no known tokenizer for {what}: use prompt ids")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    stop = tuple(tuple(tokenizer.encode(s)) for s in _STOP.value or ())
    if any(not s for s in stop):
        raise ConfigError("--stop must not be empty text")
    eos = tokenizer.eos_id if tokenizer is not None else None
    if _EOS_ID.value is not None:
        eos = None if _EOS_ID.value == -1 else _EOS_ID.value
    sampling = _sampling(eos, stop)
    try:
        sampling.check(cfg.vocab_size)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    generator = Generator(params, cfg, mesh=mesh, rules=rules, batch_size=_BATCH.value)
    results = generator.generate(ids, sampling, progress=True)
    decode = (lambda x: None) if tokenizer is None else tokenizer.decode
    for prompt, prompt_ids, samples in zip(prompts, ids, results, strict=True):
        objs = [
            {"ids": c.ids, "logprobs": c.logprobs, "text": decode(c.ids), "finish": c.finish}
            for c in samples
        ]
        if _JSON.value:
            line = dict(objs[0], **({"samples": objs} if len(objs) > 1 else {}))
            print(json.dumps(line, ensure_ascii=False), flush=True)
            continue
        shown = prompt if isinstance(prompt, str) else ",".join(map(str, prompt_ids))
        for obj in objs:
            text = (
                obj["text"] if obj["text"] is not None else " -> " + ",".join(map(str, obj["ids"]))
            )
            print(f"{shown}{text}", flush=True)
