"""Shared fixtures: tiny random backbones with a real `tokenizers` tokenizer (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

WORDS = (
    "the a is was good bad great awful love hate movie film car cars drive driving self fast slow "
    "happy sad not very really ok fine neutral think it this that i you we they"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# mpismoe-train flags for a run on the tiny backbone that takes seconds
TINY_TRAIN_FLAGS = [
    "--epochs",
    "1",
    "--min-steps",
    "0",
    "--group-size",
    "32",
    "--quant-method",
    "rtn",
    "--reduction",
    "4",
]


def tiny_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece tokenizer over a small word list plus single letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + WORDS + letters + ["##" + c for c in letters]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=50))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)  # as in real Hugging Face tokenizers (decoders skip them)
    return tok


def tiny_backbone(kind: str = "bert", layers: int = 2, hidden: int = 64):
    """A tiny randomly initialised Hugging Face encoder of the given family."""
    import transformers as tf

    torch.manual_seed(0)
    vocab = tiny_tokenizer().get_vocab_size()
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
        )
    elif kind == "roberta":
        cfg = tf.RobertaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    elif kind == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden)
    elif kind == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
        )
    else:
        raise ValueError(kind)
    model = tf.AutoModel.from_config(cfg).eval()
    with torch.no_grad():  # Hugging Face initialises biases to zero; trained models' are not
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.02)
    return model


def tiny_model(
    kind: str = "bert",
    bits: int | None = 4,
    expert_bits: int | None = 4,
    labels=("neg", "neu", "pos"),
    task: str = "classification",
    **side,
):
    """A tiny MP-ISMoE model (quantized backbone, QAT experts) with a real tokenizer."""
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model

    side_cfg = SideConfig(
        **{"reduction": 4, "num_heads": 2, "num_experts": 4, "top_k": 2, "expert_bits": expert_bits, **side}
    )
    quant = QuantConfig(bits=bits, group_size=32, method="rtn") if bits else None
    config = ModelConfig(
        backbone=f"tiny-{kind}", task=task, labels=list(labels), max_length=16, side=side_cfg, quant=quant
    )
    tok_json = None if kind == "vit" else tiny_tokenizer().to_str()
    return build_model(tiny_backbone(kind), config, tok_json, progress=False)


def random_batch(n: int = 3, t: int = 7):
    """Seeded token ids in the tiny vocabulary and a mask whose second row is padded after 4 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(5, 40, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    if n > 1:
        mask[1, 4:] = 0
    return ids, mask


TEXTS = [
    "i love this movie",
    "this car is awful",
    "it is ok",
    "self driving cars are great",
    "i hate slow cars",
    "we think it was fine",
    "really bad film",
    "very happy",
]
LABELS = [2, 0, 1, 2, 0, 1, 0, 2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path to a saved tiny MP-ISMoE checkpoint (4-bit backbone, packed 4-bit experts)."""
    from mpismoe_edge.model import save_checkpoint

    model = tiny_model().eval()
    model.pack_experts()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture
def tiny_jsonl(tmp_path):
    """A JSONL file of labelled texts in the tiny vocabulary."""
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t, "label": ["neg", "neu", "pos"][y]}) + "\n" for t, y in zip(TEXTS, LABELS))
    )
    return path


@pytest.fixture
def backbone_dir(tmp_path):
    """A Hugging Face model folder (tiny random BERT plus its fast tokenizer), as --backbone takes."""
    return save_backbone(tmp_path / "backbone")


def save_backbone(path, **kw):
    """Save ``tiny_backbone(**kw)`` and its fast tokenizer to the model folder ``path``; returns ``path``."""
    from transformers import PreTrainedTokenizerFast

    tiny_backbone(**kw).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), pad_token="[PAD]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An export directory of the tiny hand-built ONNX classifier (runtime_models.py)."""
    from runtime_models import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("export") / "out")


@pytest.fixture(scope="module")
def predictor(model_dir):
    from mpismoe_edge.runtime import Predictor

    return Predictor.from_dir(model_dir)
