"""``python -m settransformer``: the same as the ``settransformer`` command."""

from .cli import main

raise SystemExit(main())
