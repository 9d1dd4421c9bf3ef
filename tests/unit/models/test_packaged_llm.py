"""The packaged SmolLM2: converted from its GGUF file without any network, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter whose sockets refuse to connect: the conversion must not try.
SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    import torch
    from transformers import AutoModelForCausalLM
    from fedpeft.models.backbone import _gguf_file, converted_gguf, load_tokenizer

    folder = converted_gguf("smollm2-135m")
    again = converted_gguf("smollm2-135m")  # the second call reuses the folder
    gguf = _gguf_file("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    a, b = direct.state_dict(), plain.state_dict()
    tok = load_tokenizer("smollm2-135m")
    print(json.dumps({
        "same_folder": folder == again,
        "keys_equal": sorted(a) == sorted(b),
        "max_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        "params": sum(p.numel() for p in plain.parameters()),
        "eos": tok.eos_token,
        "files": sorted(p.name for p in folder.iterdir()),
    }))
    """
)


def test_gguf_converts_once_exactly_and_offline(tmp_path):
    env = {"FEDPEFT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same_folder"] and got["keys_equal"]
    assert got["max_diff"] == 0.0  # float32 holds the dequantized 4-bit values exactly
    assert got["params"] == 134_515_008 and got["eos"] == "<|im_end|>"
    assert "model.safetensors" in got["files"] and "tokenizer.json" in got["files"]
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp folder left
