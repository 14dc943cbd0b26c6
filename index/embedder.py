"""Embed images with a model bundle through onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from index.bundle import ModelBundle
from index.scoring import uncertainty_scalar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    """Model outputs for a batch of n images."""

    embedding: np.ndarray  # float32 (n, d), L2-normalised semantic embeddings
    uncertainty: np.ndarray  # float32 (n, du), uncertainty embeddings

    @property
    def uncertainty_scalar(self) -> np.ndarray:
        """||u||^2 per image, float32 (n,)."""
        return uncertainty_scalar(self.uncertainty)


class Embedder:
    """An onnxruntime session over a bundle's graph.

    `intra_op_threads` sets onnxruntime's thread pool; give each process its
    share of the cores so that several workers do not oversubscribe the CPU.
    `max_batch` splits larger inputs into several runs to bound memory.
    `spin=False` makes onnxruntime's pool threads sleep between runs instead
    of busy-waiting for the next one: a run then starts about 0.3 ms later,
    but a process that also decodes images and serves HTTP keeps its cores
    (the search server spent 2 ms of CPU per query on spinning, 40% of it).
    The session is safe to call from several threads at once.
    """

    def __init__(self, bundle: ModelBundle, *, intra_op_threads: int = 0, max_batch: int = 64, spin: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 0 lets onnxruntime use every core
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.bundle = bundle
        self.max_batch = max_batch
        self.session = ort.InferenceSession(
            str(bundle.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = bundle.manifest.input.name
        self._output_names = [
            bundle.manifest.outputs.embedding_name,
            bundle.manifest.outputs.uncertainty_name,
        ]
        self.input_size = bundle.manifest.input.size

    def embed(self, images: np.ndarray) -> Embeddings:
        """Embed preprocessed images.

        Args:
            images: uint8 (n, size, size, 3) from `index.preprocess`.
        """
        images = np.ascontiguousarray(images, dtype=np.uint8)
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 images of shape (n, {size}, {size}, 3), got {images.shape}")
        if images.shape[0] == 0:
            return Embeddings(
                embedding=np.zeros((0, self.bundle.manifest.outputs.embedding_dim), np.float32),
                uncertainty=np.zeros((0, self.bundle.manifest.outputs.uncertainty_dim), np.float32),
            )
        embeddings, uncertainties = [], []
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start : start + self.max_batch]
            embedding, uncertainty = self.session.run(self._output_names, {self._input_name: chunk})
            embeddings.append(embedding)
            uncertainties.append(uncertainty)
        return Embeddings(
            embedding=np.concatenate(embeddings).astype(np.float32, copy=False),
            uncertainty=np.concatenate(uncertainties).astype(np.float32, copy=False),
        )
