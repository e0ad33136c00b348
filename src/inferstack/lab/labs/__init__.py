"""One module per lab; each exposes `LAB` (an `inferstack.lab.base.Lab`)."""
