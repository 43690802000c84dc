"""Continue a prompt with a trained run (--workdir) or a Hugging Face directory (--hf)."""

from __future__ import annotations

import json
import math

from absl import flags

from polyglot_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint, or --step).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_HF = flags.DEFINE_string("hf", None, "Hugging Face GPT-NeoX directory (instead of --workdir).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (needs the model's tokenizer).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt as token ids, e.g. 1,2,3.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Take the most likely token (else sample).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JSON = flags.DEFINE_bool("json", False, 'Print {"ids", "logprobs", "text"} as one JSON object.')


def _check_numbers() -> None:
    """The numeric flags, before any model is loaded; one ConfigError naming the flag."""
    from polyglot_jax.config import SEED_LIMIT  # here: importing jax would slow --help

    if _MAX_NEW.value <= 0:
        raise ConfigError(f"--max_new_tokens={_MAX_NEW.value} must be a positive int")
    # isfinite refuses NaN, which `t <= 0` would let through, and inf (a uniform sample).
    if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value > 0):
        raise ConfigError(f"--temperature={_TEMPERATURE.value} must be a positive finite number")
    if _STEP.value is not None and _STEP.value < 0:
        raise ConfigError(f"--step={_STEP.value} must be an int >= 0")
    if _STEP.value is not None and _HF.value:
        raise ConfigError("--step selects a checkpoint of --workdir; --hf has none")
    if not 0 <= _SEED.value < SEED_LIMIT:
        raise ConfigError(f"--seed={_SEED.value} must be an int within [0, 2**32)")


def main(argv: list[str]) -> None:
    from polyglot_jax import generate

    if bool(_WORKDIR.value) == bool(_HF.value):
        raise ConfigError("give exactly one of --workdir and --hf")
    if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
        raise ConfigError("give exactly one of --prompt and --prompt_ids")
    _check_numbers()
    if _WORKDIR.value:
        cfg, params, tokenizer_dir = generate.load_from_workdir(_WORKDIR.value, _STEP.value)
    else:
        cfg, params, tokenizer_dir = generate.load_from_hf(_HF.value)
    tokenizer = generate.load_tokenizer_dir(tokenizer_dir)
    if _PROMPT_IDS.value is not None:
        try:
            prompt_ids = [int(i) for i in _PROMPT_IDS.value]
        except ValueError:
            raise ConfigError(
                f"--prompt_ids={','.join(_PROMPT_IDS.value)} must be integers"
            ) from None
    elif tokenizer is None:
        raise ConfigError("this model has no known tokenizer: use --prompt_ids")
    else:
        prompt_ids = tokenizer.encode(_PROMPT.value)
    ids, logprobs = generate.generate(
        params,
        cfg,
        prompt_ids,
        max_new_tokens=_MAX_NEW.value,
        greedy=_GREEDY.value,
        temperature=_TEMPERATURE.value,
        seed=_SEED.value,
        eos_id=None if tokenizer is None else tokenizer.eos_id,
    )
    text = None if tokenizer is None else tokenizer.tokenizer.decode(ids)
    if _JSON.value:
        print(json.dumps({"ids": ids, "logprobs": logprobs, "text": text}, ensure_ascii=False))
    else:
        prompt = _PROMPT.value if _PROMPT.value is not None else ",".join(map(str, prompt_ids))
        print(f"{prompt}{text if text is not None else ' -> ' + ','.join(map(str, ids))}")
