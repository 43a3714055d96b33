"""The spec's public names under the module path ``autofinetune.spec.schema``.

The spec is split into modules of one responsibility (see :mod:`autofinetune.spec`); import
from :mod:`autofinetune.spec`. This module keeps ``from autofinetune.spec.schema import ...``
working for callers that still use it.
"""

from autofinetune.spec import *  # noqa: F401,F403
from autofinetune.spec import __all__  # noqa: F401
