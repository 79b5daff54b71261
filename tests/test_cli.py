"""`python -m fedmpi`'s dispatch: one-process commands end on Ctrl-C with one line, not a traceback."""

from fedmpi import cli, report


def test_an_interrupted_report_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    assert cli.main(["report", "some_run"]) == 130
    assert capsys.readouterr().err == "fedmpi report: interrupted\n"
