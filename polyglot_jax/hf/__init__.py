"""Hugging Face GPT-NeoX interchange: the tensor and config mapping, HF directory files, orbax arrays
read and written block by block, and the streaming converter built on them.

    mapping.py       our parameters <-> HF state dict, our ModelConfig <-> HF config.json
    files.py         an HF directory's files: config.json, safetensors (streaming writer), reading
                     safetensors or pytorch_model.bin one tensor at a time
    orbax_arrays.py  the `params` item of an orbax checkpoint, read and written with tensorstore
    convert.py       `to_hf`, `from_hf`
    model_card.py    the README.md model card `to_hf` writes
    verify.py        `verify_hf_against_workdir`: transformers' logits on an export vs ours
"""
