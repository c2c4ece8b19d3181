"""Sessions: `nox -s tests` (the CI command), `nox -s eval` (main job on the shipped weights),
`nox -s cosim`, `nox -s verilog`, `nox -s budget`, `nox -s bench`, `nox -s train -- [nqe train options]`.

Every session installs the project with the pinned constraints.txt, so torch resolves to the
local CPU build and CI sees exactly the versions the developers tested.
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")


def _install(session, extras="test,cosim,plot"):
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session):
    """The whole suite, slow tests included (pass `-- -m "not slow"` for the quick subset)."""
    _install(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(name="eval")
def eval_(session):
    """Main job: integer-reference accuracy of weights/nqe-1mb on the 10,000 test images, and
    the PyTorch model on the same weights compared prediction by prediction."""
    _install(session)
    session.run("nqe", "eval", "--weights", "weights/nqe-1mb", "--compare-model",
                *session.posargs)


@nox.session
def cosim(session):
    """The RTL of the shipped weights on Verilator vs the integer reference, on real test images:
    mismatches, accuracy, cycles per image, MAC utilization per layer, simulated cycles/s.
    `nox -s cosim -- --images 10000` runs the whole test set (see README for the time it takes)."""
    _install(session)
    session.run("nqe", "cosim", "--weights", "weights/nqe-1mb", *(session.posargs or
                                                                   ["--images", "100"]))


@nox.session
def verilog(session):
    """Verilog of the accelerator for the shipped weights, linted with verilator -Wall."""
    _install(session)
    session.run("nqe", "verilog", "--weights", "weights/nqe-1mb", "-o", "build/verilog",
                *session.posargs)


@nox.session
def budget(session):
    _install(session)
    session.run("nqe", "budget", *session.posargs)


@nox.session
def bench(session):
    _install(session)
    session.run("nqe", "bench", "--weights", "weights/nqe-1mb", *session.posargs)


@nox.session
def train(session):
    _install(session)
    session.run("nqe", "train", *session.posargs)
