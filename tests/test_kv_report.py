"""The key-value experiment's reports (results.json, results.md, results.png)."""

from calm_jax.experiments import kv_report, kv_scoring


def test_reports_warn_when_a_pretrained_model_missed_its_own_skill(tmp_path):
    def accuracy(mb_numeric):
        return {"mA": {"kv_substitution": 98.0, "numeric_arithmetic": 0.0, "kv_arithmetic": 0.0},
                "mB": {"kv_substitution": 0.0, "numeric_arithmetic": mb_numeric,
                       "kv_arithmetic": 0.0},
                "CALM": {"kv_substitution": 84.0, "numeric_arithmetic": 9.2,
                         "kv_arithmetic": 7.8}}

    # A run whose mB stayed on its loss plateau (measured: 10.2%, CALM 7.8% on held-out keys).
    results = {"accuracy": accuracy(10.2), "ablations": {"CALM": 7.8}, "stages": {},
               "seconds": 1.0}
    kv_report.write_reports(str(tmp_path), results)
    table = (tmp_path / "results.md").read_text()
    assert "**Warning**: mB reached 10.2% on numeric_arithmetic" in table
    assert "mA reached" not in table
    assert kv_scoring.pretraining_warnings(accuracy(10.2), threshold=5.0) == []
    results["accuracy"] = accuracy(100.0)
    kv_report.write_reports(str(tmp_path), results)
    assert "Warning" not in (tmp_path / "results.md").read_text()
