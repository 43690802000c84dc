"""Loads exported HF directories with the transformers of this interpreter's path (4.x, from the
directory that the Makefile's `.venv/.installed-tf4` fills) and writes what it sees, for
tests/hf/test_transformers4.py to compare with transformers 5.x:

    PYTHONPATH=.venv/tf4 python tests/hf/transformers4_check.py OUT_DIR TEXTS_JSON HF_DIR...

For each HF_DIR (numbered i): `AutoTokenizer` ids and decoded text of every text, the ids of the
tokenizer's special tokens, `AutoModelForCausalLM` float32 logits of each text's ids
(OUT_DIR/i-<text number>.npy) and 8 greedy tokens after the first text. The summary, with the
versions, is OUT_DIR/summary.json. Offline: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["USE_TF"] = "0"  # transformers 4.x would import the venv's TensorFlow (seqio's)
os.environ["USE_FLAX"] = "0"
os.environ["USE_TORCH"] = "1"

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def check(hf_dir: str, texts: list[str], out: pathlib.Path, number: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    ids = [tokenizer(text)["input_ids"] for text in texts]
    with torch.no_grad():
        for k, row in enumerate(ids):
            logits = model(torch.tensor([row])).logits[0].numpy()
            np.save(out / f"{number}-{k}.npy", logits.astype(np.float32))
        generated = model.generate(
            torch.tensor([ids[0]]), do_sample=False, max_new_tokens=8, min_new_tokens=8
        )
    special = {
        token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens
    }
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "model_class": type(model).__name__,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "ids": ids,
        "decoded": [tokenizer.decode(row) for row in ids],
        "special_ids": special,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "generated": generated[0, len(ids[0]) :].tolist(),
    }


def main(argv: list[str]) -> None:
    out, texts_file, *hf_dirs = argv
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = json.loads(pathlib.Path(texts_file).read_text(encoding="utf-8"))
    summary = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers_file": transformers.__file__,
        "exports": [check(d, texts, out, i) for i, d in enumerate(hf_dirs)],
    }
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
