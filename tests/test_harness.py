"""acip.eval.lm_eval: lm-evaluation-harness on an exported model, with a local task file (no downloads)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import acip

TASK = """task: acip_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _task(tmp_path):
    rows = [{"question": "The sky is", "choices": [" blue", " green"], "answer": 0},
            {"question": "Fire is", "choices": [" cold", " hot"], "answer": 1},
            {"question": "Snow is", "choices": [" white", " black"], "answer": 0},
            {"question": "Grass is", "choices": [" red", " green"], "answer": 1}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tasks" / "local_mc.yaml"
    task.parent.mkdir()
    task.write_text(TASK.format(data=data))
    return task


def _export():
    from acip.train.models import tiny_llama

    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    pm = acip.parametrize(model)
    return acip.export(pm, 0.6, score_map=acip.ScoreMap.from_singular_values(pm)), tok


def test_lm_eval_runs_a_local_task_on_an_export(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    task = _task(tmp_path)
    small, tok = _export()
    res = acip.eval.lm_eval(small, tok, tasks=[str(task)], batch_size=2, bootstrap_iters=0, builtin_tasks=False)
    row = res["results"]["acip_local_mc"]
    assert 0.0 <= row["acc,none"] <= 1.0 and row["sample_len"] == 4
    # the harness's log-likelihoods are the model's own: choice scores from a direct forward agree
    with torch.no_grad():
        ids = tok("The sky is blue", add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert torch.isfinite(small(input_ids=ids).logits).all()
    # by name with include_path, and an unknown name is a clear error
    res2 = acip.eval.lm_eval(small, tok, tasks=["acip_local_mc"], include_path=task.parent, batch_size=2,
                             bootstrap_iters=0, builtin_tasks=False)
    assert res2["results"]["acip_local_mc"]["acc,none"] == row["acc,none"]
    with pytest.raises(ValueError, match="does not know the task"):
        acip.eval.lm_eval(small, tok, tasks=["no_such_task_xyz"], include_path=task.parent, builtin_tasks=False)


def test_lm_eval_without_the_harness_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    from acip.eval.harness import LMEvalMissingError

    with pytest.raises(LMEvalMissingError, match=r'pip install "acip\[eval\]"'):
        acip.eval.lm_eval(torch.nn.Linear(2, 2), object(), tasks=["x"])
    with pytest.raises(ImportError):  # an ImportError, for callers that catch that
        acip.eval.lm_eval(torch.nn.Linear(2, 2), object(), tasks=["x"])
