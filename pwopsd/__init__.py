"""pw-opsd support package: the plumbing the stage files (data, rollout, teacher, loss, train, evaluate, diagnose)
import. Nothing in here imports a stage file (tests/test_layout.py checks it)."""
