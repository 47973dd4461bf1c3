"""training.png: one loss axis for training and eval loss, the eval metric in its own panel when it is not the loss,
the learning rate below, the best step marked."""

from lorakit.training.rundir import panels, plot

RECORDS = [{"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3}, {"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 8e-4},
           {"step": 2, "eval": {"loss": 1.7, "accuracy": 0.5, "macro_f1": 0.4}},
           {"step": 3, "epoch": 1.5, "loss": 1.2, "lr": 6e-4}, {"step": 4, "eval": {"loss": 1.9, "accuracy": 0.4}}]


def test_losses_share_one_axis_and_the_learning_rate_has_its_own():
    drawn = panels(RECORDS, "accuracy")
    assert [name for name, _ in drawn] == ["loss", "eval accuracy", "learning rate"]
    assert drawn[0][1] == [("training loss", [1, 2, 3], [2.0, 1.5, 1.2]), ("eval loss", [2, 4], [1.7, 1.9])]
    assert drawn[1][1] == [("eval accuracy", [2, 4], [0.5, 0.4])]
    assert drawn[2][1] == [("learning rate", [1, 2, 3], [1e-3, 8e-4, 6e-4])]


def test_a_language_models_loss_is_not_drawn_twice():
    assert [name for name, _ in panels(RECORDS, "loss")] == ["loss", "learning rate"]
    assert [name for name, _ in panels(RECORDS[:2], "loss")] == ["loss", "learning rate"]  # no evaluation yet


def test_the_plot_is_written_with_the_best_step(tmp_path):
    plot(RECORDS, tmp_path / "training.png", "accuracy", best_step=2)
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
