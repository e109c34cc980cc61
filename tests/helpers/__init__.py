"""Shared test helpers, each in one place: `env` (the repository, the stack, a child process's environment),
`cli` (the CLI in a subprocess or in-process), `dist` (free ports, torchrun, a one-rank process group), `builders`
(tiny real models and finding assertions), `patching` (the patch tests' faults and proofs) and `train` (the resume /
signal / lock tests' `gradflow train` runs)."""
