import io

from specrelay.loadgen.progress import ProgressBar


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_draws_in_place_on_a_terminal():
    out = Tty()
    bar = ProgressBar(10, "trajectories", stream=out)
    bar.update(5, requests=7, errors=1, force=True)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r[" + "#" * 15 + "." * 15 + "] 5/10 trajectories  7 requests  1 errors")
    assert text.endswith("\n")


def test_the_bar_is_silent_off_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(10, "trajectories", stream=out)
    bar.update(5, requests=7, errors=1, force=True)
    bar.close()
    assert out.getvalue() == ""
