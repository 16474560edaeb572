"""Saving and loading models and training checkpoints, and ONNX export.

Files are `safetensors <https://github.com/huggingface/safetensors>`_ files: an
8-byte little-endian header length, a JSON header, then the raw little-endian
tensor bytes. Nothing is pickled and nothing in a file is ever executed: layers are
rebuilt from a fixed table of layer types and activation names, and every field of
the header is checked before any array is made. See ``docs/persistence.md`` for the
format, its guarantees and examples.

- :func:`save` / :func:`load`: a model's architecture and parameters; a model saved
  from any backend loads on any other.
- :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`restore_checkpoint` and
  the :class:`Checkpoint` callback: everything a training run needs to continue
  bit-identically (optimiser moments, step counts, schedule state, random-generator
  state); ``fit(..., resume_from=path)`` uses them.
- :func:`export_onnx`: the inference graph as an ONNX model (the ``onnx`` extra).

Every problem with a file's contents raises :class:`ModelFileError`, whose message
names the file and the problem. Writes are atomic: a temporary file in the target's
folder is written, flushed and synced, then renamed over the target, so a crash never
leaves a half-written file under the final name.

The package's modules, from the bottom up: ``container`` (safetensors framing,
checksums, atomic writes, :class:`ModelFileError`), ``layout`` (what model files and
checkpoints hold, and reading them), ``checkpoints`` (training state, without the model
classes), ``models`` (model files, the one module that builds models) and ``onnx``.
"""

from .checkpoints import Checkpoint, restore_checkpoint, save_checkpoint
from .container import FORMAT_NAME as FORMAT_NAME
from .container import FORMAT_VERSION, ModelFileError
from .container import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from .container import _write_file as _write_file
from .layout import _model_config as _model_config
from .layout import _model_payload as _model_payload
from .layout import _read as _read
from .models import load, load_checkpoint, save
from .onnx import export_onnx

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "ModelFileError",
    "export_onnx",
    "load",
    "load_checkpoint",
    "restore_checkpoint",
    "save",
    "save_checkpoint",
]
