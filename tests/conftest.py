from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
SHARED_DATA = Path(os.environ.get("RMFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real preference data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _rmflow_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RMFLOW_HOME", str(tmp_path_factory.getbasetemp() / "rmflow_home"))
    monkeypatch.setenv("RMFLOW_LABEL_STUDIO_VENV", os.environ.get("RMFLOW_LABEL_STUDIO_VENV", str(Path.home() / ".rmflow/labelstudio/venv")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT with the real MiniLM tokenizer: fast enough for training tests. Seeded,
    so every session trains from the same initial weights (thresholds do not depend on the draw)."""
    import torch
    from transformers import BertConfig, BertModel

    from rmcore.model import load_tokenizer, resolve_backbone

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = load_tokenizer(resolve_backbone("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """240 synthetic prompts, K=4, one annotator ranking by gold reward with mild noise."""
    from rmcore.converters.common import ConversionResult
    from rmcore.dataset import write_preference_dataset
    from rmcore.synthetic import synthetic_items, synthetic_rankings

    out = tmp_path_factory.mktemp("synthetic_ds")
    rankings = synthetic_rankings(synthetic_items(240, k=4, seed=1), annotators=1, noise=0.3, seed=2)
    write_preference_dataset(ConversionResult(rankings=rankings), out, {"kind": "synthetic"})
    return out


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio on 127.0.0.1 for the whole session, in a fresh data dir. The venv is
    shared across runs (RMFLOW_LABEL_STUDIO_VENV, default ~/.rmflow/labelstudio/venv): installing
    it takes a minute, once per machine."""
    mp = pytest.MonkeyPatch()
    home = str(tmp_path_factory.getbasetemp() / "rmflow_home")
    mp.setenv("RMFLOW_HOME", home)
    mp.setenv("RMFLOW_LABEL_STUDIO_VENV", os.environ.get("RMFLOW_LABEL_STUDIO_VENV", str(Path.home() / ".rmflow/labelstudio/venv")))
    mp.delenv("LABEL_STUDIO_URL", raising=False)
    mp.delenv("LABEL_STUDIO_API_KEY", raising=False)
    from rmflow.infra import labelstudio

    url = labelstudio.up(port=18080)["url"]
    yield url
    # a module fixture set up before this one (test_team's stack) restores RMFLOW_HOME to its own
    # earlier value when it ends: stop the server this fixture started, recorded in this home
    os.environ["RMFLOW_HOME"] = home
    labelstudio.down()
    mp.undo()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 with a small word-level tokenizer shaped like Qwen's: no bos, pad ==
    eos (`<|im_end|>`), and a ChatML chat template. Offline, seeded."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    from rmcore.synthetic import synthetic_items

    path = tmp_path_factory.mktemp("tiny_qwen2")
    # byte-level BPE like Qwen's (transformers rebuilds a qwen2 checkpoint's tokenizer as one)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [t for i in synthetic_items(300, 4, seed=0) for t in (i.prompt, *i.responses)] + ["user assistant system"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=core.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2Model(cfg).save_pretrained(path)
    return path
