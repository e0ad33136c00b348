"""`inferstack lab`: the curriculum's experiments as commands (docs/labs.md).

`base` defines a lab and its result, `runtime` starts what a lab needs with the stack's own code
(`inferstack up`, `inferstack bench`) and stops it by PID, `report` writes report.md, results.json
and PNG plots, `registry` lists every lab, and `labs/`
holds one module per lab.
"""
