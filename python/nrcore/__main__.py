"""`python -m nrcore ...`: the `nrcore` command, for launchers that start a module
(`torchrun --standalone --nproc-per-node N -m nrcore train ...`)."""

from nrcore.cli import main

if __name__ == "__main__":
    main()
