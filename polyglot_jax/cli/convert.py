"""Convert checkpoints: `convert to-hf` (run dir -> Hugging Face GPTNeoX dir) or `convert from-hf`.

    polyglot-jax convert to-hf --workdir=RUN [--step=N] --out=HF_DIR [--dtype=float16]
        [--max_shard_size=5GB] [--tokenizer=DIR] [--license=apache-2.0]
        [--eval_results=kobest.json,...] [--overwrite] [--verify]
    polyglot-jax convert from-hf --hf=HF_DIR --out=RUN [--config=configs/x.py] [--overwrite] [--verify]

Both stream tensor by tensor (a 12.8B model converts on a 24 GB machine); `--verify` then loads
both models with transformers / JAX and prints the largest logits difference on random tokens.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from polyglot_jax.errors import ConfigError

DIRECTIONS = ("to-hf", "from-hf")
TAKES_WORDS = True  # the direction

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "to-hf: the run directory (config.json, checkpoints/)."
)
_STEP = flags.DEFINE_integer("step", None, "to-hf: the checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string(
    "out", None, "Output directory: the HF directory (to-hf) or run directory (from-hf)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float16", ["float16", "bfloat16", "float32"], "to-hf: dtype of the written weights."
)
_MAX_SHARD_SIZE = flags.DEFINE_string(
    "max_shard_size", "5GB", "to-hf: largest safetensors file (5GB = 5e9 bytes, 2GiB = 2**31)."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "to-hf: tokenizer directory to include (default: the run's config.data.tokenizer).",
)
_LICENSE = flags.DEFINE_string(
    "license", None, "to-hf: the model card's Hub license id (default: apache-2.0, said so)."
)
_EVAL_RESULTS = flags.DEFINE_list(
    "eval_results",
    [],
    "to-hf: `eval kobest` result files for the model card (besides WORKDIR/eval/*.json).",
)
_HF = flags.DEFINE_string("hf", None, "from-hf: the Hugging Face GPTNeoX directory.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "from-hf: run config for everything but the architecture (default: the base config).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
_VERIFY = flags.DEFINE_bool(
    "verify", False, "Afterwards compare transformers' logits with ours (needs torch)."
)
_VERIFY_TOLERANCE = flags.DEFINE_float(
    "verify_tolerance", 1e-3, "--verify fails (exit 1) above this max |logits difference|."
)


def _required(flag) -> str:
    if not flag.value:
        raise ConfigError(f"--{flag.name} is required")
    return flag.value


def main(argv):
    words = argv[1:]
    if len(words) != 1 or words[0] not in DIRECTIONS:
        raise ConfigError(
            f"say which way: convert to-hf ... or convert from-hf ... (got {' '.join(words) or 'nothing'})"
        )
    from polyglot_jax.errors import InputError
    from polyglot_jax.hf import convert, verify  # after flag parsing: --help and usage errors fast
    from polyglot_jax.hf.files import parse_size

    try:
        parse_size(_MAX_SHARD_SIZE.value)
    except InputError as e:
        raise ConfigError(f"--max_shard_size: {e}") from None

    if words[0] == "to-hf":
        workdir = _required(_WORKDIR)
        result = convert.to_hf(
            workdir,
            _required(_OUT),
            step=_STEP.value,
            dtype=_DTYPE.value,
            max_shard_size=_MAX_SHARD_SIZE.value,
            tokenizer=_TOKENIZER.value,
            overwrite=_OVERWRITE.value,
            license=_LICENSE.value,
            eval_results=_EVAL_RESULTS.value,
        )
        print(
            f"step {result.step} of {workdir} -> {result.out}: {len(result.files)} safetensors file(s)"
        )
    else:
        result = convert.from_hf(
            _required(_HF), _required(_OUT), config=_CONFIG.value, overwrite=_OVERWRITE.value
        )
        print(
            f"{_HF.value} -> {result.out}/checkpoints/0 (continue with --config.train.init_from={result.out})"
        )
    mb_s = result.tensor_bytes / 1e6 / max(result.seconds, 1e-9)
    print(
        f"{result.tensor_bytes / 1e9:.3f} GB of tensors in {result.seconds:.1f} s ({mb_s:.0f} MB/s)"
    )
    if _VERIFY.value:
        if words[0] == "to-hf":
            diff = verify.verify_hf_against_workdir(
                result.out, workdir, step=result.step, hf_weights_dtype=_DTYPE.value
            )
        else:
            diff = verify.verify_hf_against_workdir(_HF.value, result.out)
        print(f"verify: max |logits difference| = {diff:.3g}")
        if not diff <= _VERIFY_TOLERANCE.value:
            print(f"verify: above the tolerance {_VERIFY_TOLERANCE.value:g}")
            return 1
    return 0
