"""The Triton model repository that ``bsym export`` fills: describe, render, parse, write.

One description (:class:`~bsym.export.triton.description.TritonModelConfig`, read off an
exported ``model.onnx`` and its metadata) renders to ``config.pbtxt`` in two flavours that
agree on tensors and batching:

- ``production``: Triton's ONNX Runtime backend on GPUs (``KIND_GPU``);
- ``cpu``: the Python backend running the same ``model.onnx`` with ONNX Runtime on
  ``KIND_CPU`` instances (``bsym/serving/triton_backend/model.py``), for machines without a GPU.

Both record the sha256 of every version's ``model.onnx`` under a ``parameters`` entry named by
:func:`bsym.contract.checksum_key`; the Python backend refuses to load a file whose checksum
differs.

Both also serve what a client needs to read ROOT files for the model: the ``bsym_*`` entries of
each version's ONNX ``metadata_props`` (feature spec, model name, class labels, bsym version and
git commit) plus ``bsym_spec_version``, as ``parameters`` named ``<version>/<key>``
(:func:`bsym.contract.metadata_key`). Triton's model-metadata API gives only tensor names, types
and shapes, and nothing reads the ONNX file's own metadata on the server; the model config,
which ``get_model_config`` returns verbatim, is the one place a gRPC client can read them. They
are per version because one ``config.pbtxt`` serves every version of a model.

Modules: :mod:`.common` (the flavours and data types, light enough for the CLI),
:mod:`.description`, :mod:`.render`, :mod:`.parse` (needs the ``triton`` extra) and
:mod:`.repository`.
"""
