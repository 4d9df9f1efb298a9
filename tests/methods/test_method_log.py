"""What a method reports after each epoch (Method.end_epoch) lands in method_log.csv, one row an epoch."""

from gapbench.recipe import load_recipe
from gapbench.train import train_run


def test_aggressive_logs_its_mutual_information_and_a_plain_vae_logs_nothing(tiny_method_recipe, tmp_path):
    train_run(load_recipe(tiny_method_recipe("aggressive", epochs=2)), tmp_path / "agg")
    lines = (tmp_path / "agg" / "method_log.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[0] == "epoch" and "mutual_info" in header and "aggressive" in header
    assert [row.split(",")[0] for row in lines[1:]] == ["1", "2"]
    mi = [float(row.split(",")[header.index("mutual_info")]) for row in lines[1:]]
    assert all(v >= 0 for v in mi)
    train_run(load_recipe(tiny_method_recipe("vae", epochs=1)), tmp_path / "vae")
    assert not (tmp_path / "vae" / "method_log.csv").exists()
