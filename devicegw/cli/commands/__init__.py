"""One module per ``devicegw`` command: each has ``register(sub)``, which adds its
parser and sets ``func`` to the function that runs it. Heavy imports stay inside
those functions so ``devicegw --help`` starts fast."""
