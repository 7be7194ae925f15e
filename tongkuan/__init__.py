"""tongkuan composition root: settings, the command line, evaluation and the demo.

The pipeline stages live in the card's top-level packages (events, workers, index, vision, query, ...);
this package only wires them together.
"""

__version__ = "0.1.0"
