"""DLG on a masked language model (DLG Table 1): the embedded sentences and their local vocabulary, BERT's
double backward, a tiny-scale recovery through a grid, and one-line errors for text grids that cannot run."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from leakbench.cli import main
from leakbench.errors import ConfigError
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DATASETS, MODELS
from leakbench.run.grid import parse_grid
from leakbench.run.report import render
from leakbench.run.runner import Runner, RunOptions
from leakbench.text import shipped_yaml

# A sentence leaks when at least half of its tokens come back in place (the grids' verdict threshold):
# half a sentence's words in order is more than the bag of words the embedding gradient alone gives away.
TINY_LEAK_THRESHOLD = 0.5
TINY_MODEL = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "max_positions": 16, "init_std": 0.2}
TEXT_VERDICT = {"metric": "token_accuracy", "threshold": TINY_LEAK_THRESHOLD, "max_leak_rate": 0.25}


def test_the_table1_sentences_are_embedded_with_a_local_deterministic_vocabulary():
    source = shipped_yaml("_text-dlg-table1.yaml")
    assert "Table 1" in source["source"] and len(source["sentences"]) == 3
    data = DATASETS.build("table1-sentences").load("test")
    assert data.texts == source["sentences"] and DATASETS.get("table1-sentences").modality == "text"
    vocabulary = data.vocabulary
    assert 500 < vocabulary.size <= 2000
    for ids, text in zip(data.token_ids, data.texts):
        assert ids[0] == vocabulary.cls_id and ids[-1] == vocabulary.sep_id and vocabulary.unk_id not in ids
        # lower-cased like bert-base-uncased; only the hyphen of "Thirty-Third" comes back spaced
        assert vocabulary.decode(ids).replace(" - ", "-") == text.lower()
    again = DATASETS.build("table1-sentences").load("train")  # trained again from the corpus: the same ids
    assert again.token_ids == data.token_ids
    short = DATASETS.build("table1-sentences", {"max_words": 3}).load("test")
    assert short.texts[2] == "We invite submissions" and len(short.token_ids[2]) == 5  # [CLS] 3 words [SEP]


def test_bert_mlm_is_twice_differentiable_with_eager_attention():
    model = build_model("bert-mlm", (8,), 50, seed=1, **{**TINY_MODEL, "layers": 1})
    assert model.config._attn_implementation == "eager" and not model.config.tie_word_embeddings
    again = build_model("bert-mlm", (8,), 50, seed=1, **{**TINY_MODEL, "layers": 1})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded init
    embeds = torch.randn(1, 8, 64, requires_grad=True)
    loss = model(inputs_embeds=embeds).logits[0, 3].logsumexp(-1)
    grads = torch.autograd.grad(loss, list(model.parameters())[1:], create_graph=True)
    second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), embeds)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def tiny_grid(**overrides) -> dict:
    return {"name": "tiny-text", "datasets": [{"name": "table1-sentences", "params": {"max_words": 3}}],
            "models": [{"name": "bert-mlm", "params": TINY_MODEL}],
            "attacks": [{"name": "dlg-text", "params": {"steps": 20}}], "defenses": ["none"], "targets": 1,
            "verdict": TEXT_VERDICT, **overrides}


def test_dlg_text_recovers_a_short_sentence_through_a_grid_and_noise_stops_it(tmp_path):
    """A 2-layer BERT of width 64, 20 steps: "Registration, volunteer applications," comes back from the masked-LM
    gradient to at least TINY_LEAK_THRESHOLD token accuracy; Gaussian noise of variance 100 on the shared
    gradient (the image grids' defense, unchanged) stops it. The record carries the text after steps 0,
    10 and 20, the table the text columns, and the report a Markdown transcript."""
    grid = parse_grid(tiny_grid(defenses=["none", {"name": "gaussian-noise", "params": {"variance": 100.0}}]))
    records = {r["defense"]: r for r in Runner(grid, RunOptions(out_dir=tmp_path, progress=False)).run()}
    per = records["none"]["per_target"]
    assert per["text"] == ["Registration, volunteer applications,"]
    assert per["token_accuracy"][0] >= TINY_LEAK_THRESHOLD, per
    assert set(per["history"][0]) == {"0", "10", "20"} and per["recovered"][0] == per["history"][0]["20"]
    assert per["history"][0]["0"] != per["recovered"][0]  # the random start is not the answer
    assert records["none"]["metrics"]["leak_rate"] == 1.0 and records["none"]["threat"]["setting"] == "text-gradient"
    noised = records["gaussian-noise"]
    assert noised["per_target"]["token_accuracy"][0] < TINY_LEAK_THRESHOLD, noised["per_target"]
    assert noised["verdict"]["defended"]
    table = render(tmp_path)
    assert "dlg-text token acc" in table and "dlg-text exact" in table
    transcript = (tmp_path / "reconstructions_dlg-text_table1-sentences_bert-mlm.md").read_text()
    assert "| original | Registration, volunteer applications, |" in transcript and "## gaussian-noise" in transcript
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["per_target"]["recovered"]


@pytest.mark.parametrize("change, message", [
    ({"models": [{"name": "bert-mlm", "params": {"hidden": 64, "heads": 5}}]},
     r"model 'bert-mlm': parameter 'heads' = 5 is invalid; allowed: a divisor of hidden = 64"),
    ({"verdict": {"metric": "ssim", "threshold": 0.3}}, r"verdict.metric = 'ssim' cannot judge text attacks"),
    ({"attacks": [{"name": "dlg-text", "params": {"distance": "manhattan"}}]},
     r"'distance' = 'manhattan' is invalid; allowed: one of 'embedding-layer', 'cosine', 'l2'"),
    ({"threat": {"model_state": "trained", "train_steps": 2}}, r"threat.model_state = 'trained' is not supported"),
    ({"attacks": ["dlg"], "datasets": ["digits"], "models": ["lenet-zhu"]},
     r"verdict.metric = 'token_accuracy' cannot judge image reconstructions; allowed: mse, psnr, ssim"),
])
def test_text_grids_that_cannot_run_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_grid(tiny_grid(**change))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"datasets": [{"name": "digits"}]}, "needs a text dataset, 'digits' is not one"),
    ({"models": ["lenet-zhu"]}, "model 'lenet-zhu' is not a masked language model"),
    ({"targets": 4}, "targets = 4 is too many for table1-sentences: it has 3 sentences"),
    ({"defenses": [{"name": "large-batch", "params": {"batch_size": 4}}]}, "changes the victim's batch"),
])
def test_text_cells_are_checked_against_their_data_before_anything_runs(tmp_path, capsys, change, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(**change)))
    assert main(["run", "--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_the_text_components_are_registered():
    assert ATTACKS.get("dlg-text").setting == "text-gradient"
    assert "bert-mlm" in MODELS and "table1-sentences" in DATASETS
