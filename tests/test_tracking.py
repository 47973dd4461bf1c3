"""--report-to: the records of log.jsonl reach TensorBoard's event files and an offline Weights & Biases run; a
missing library is refused before training."""

import json

import pytest

from lorakit.errors import ConfigError
from lorakit.training import tracking
from lorakit.training.rundir import read_log
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train


def run(bert_dir, topics_csv, out, report_to: str) -> list[dict]:
    """A 4-step classification run reporting to `report_to`; its log.jsonl records."""
    train(TrainConfig(model=str(bert_dir), data=str(topics_csv), eval_data=str(topics_csv), output=str(out),
                      batch_size=8, max_length=16, max_steps=4, log_every=1, eval_every=2, dropout=0.0,
                      report_to=report_to), progress=False)
    return read_log(out / "log.jsonl")


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    found = {}
    for record in records:
        for name, value in tracking.scalars(record).items():
            found.setdefault(name, []).append((record["step"], value))
    return found


def test_tensorboard_gets_every_logged_value(bert_dir, topics_csv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = run(bert_dir, topics_csv, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    expected = expected_scalars(records)
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name  # stored as float32


def test_wandb_offline_run_holds_every_logged_value(bert_dir, topics_csv, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = run(bert_dir, topics_csv, tmp_path / "run", "wandb")
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # The run file is a log of protobuf records; keys and values are stored as text (values as JSON, whole
    # floats written as integers).
    content = files[0].read_bytes()
    for name, points in expected_scalars(records).items():
        assert name.encode() in content, name
        for _, value in points:
            text = json.dumps(int(value) if float(value).is_integer() else value)
            assert text.encode() in content, (name, value)


def test_a_missing_library_is_refused_before_training(bert_dir, topics_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package: pip install 'lorakit\[wandb\]'"):
        run(bert_dir, topics_csv, tmp_path / "run", "wandb")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="report_to must be one of"):
        run(bert_dir, topics_csv, tmp_path / "run", "mlflow")
