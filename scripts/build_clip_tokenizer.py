"""Convert CLIP's BPE merge list (open-clip-torch's bpe_simple_vocab_16e6.txt.gz, MIT) into the
vocab.json / merges.txt / tokenizer_config.json that transformers' CLIPTokenizer loads.

Run once; its output is committed under sepen_core/clip_tokenizer/:
    pip download --no-deps open-clip-torch && unzip -j open_clip_torch-*.whl '*bpe_simple_vocab_16e6.txt.gz'
    python scripts/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz sepen_core/clip_tokenizer
"""

import argparse
import gzip
import json
from pathlib import Path

# CLIP's vocabulary: 256 byte symbols, the same with an end-of-word marker, one token per merge,
# then the two special tokens; 49,408 in all, so the merge list is cut at 49,408 - 512 - 2.
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in for each of the 256 byte values, in GPT-2/CLIP order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a version header
    assert all(len(m) == 2 for m in merges), "unexpected merge-file format"

    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    build(args.bpe_gz, args.out_dir)
