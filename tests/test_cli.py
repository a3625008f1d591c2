from deqdiff.cli import main


def test_demo_job_passes_its_derivative_checks(capsys):
    assert main(["demo", "--n", "6", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "order 3" in out and "FAIL" not in out
