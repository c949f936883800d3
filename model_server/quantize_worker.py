"""A child process that quantises one TorchScript artifact: dynamic int8 of its Linear and LSTM
layers through torch's graph-mode `quantize_dynamic_jit`.

The TorchScript bytes come in on stdin and the quantised module's TorchScript bytes go out on
stdout. It runs apart from the model server because that quantiser is native code that can
crash on graphs it does not expect (a scripted `nn.TransformerEncoder` makes it segfault in
torch 2.13): a crash here fails one load with its reason instead of killing the server.

    python -m model_server.quantize_worker < model.pt > model.int8.pt
"""

from __future__ import annotations

import io
import sys

import torch
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic_jit


def main() -> None:
    torch.set_num_threads(1)
    data = sys.stdin.buffer.read()
    # torch.jit.load resolves only tensor and TorchScript types (never arbitrary pickles);
    # the model server verified these bytes against the registry's sha256 before sending them.
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
    # Under no_grad: with autograd on, its module walk reads `.grad` of non-leaf weights and
    # torch warns. quantize_dynamic_jit is unannotated in torch's own sources.
    with torch.no_grad():
        quantized = quantize_dynamic_jit(module.eval(), {"": default_dynamic_qconfig})  # type: ignore[no-untyped-call]
    out = io.BytesIO()
    torch.jit.save(quantized, out)
    sys.stdout.buffer.write(out.getvalue())


if __name__ == "__main__":
    main()
