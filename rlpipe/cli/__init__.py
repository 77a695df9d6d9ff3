"""`rlpipe run | serve | stats | status | plot | export | demo | ...`: argparse and dispatch
(main.py), and the command-line tools that only read a run (status, plot, export), the live
console and the demo. Each role's logic lives in its role (rlpipe/pipeline/)."""
