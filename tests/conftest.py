import os

from hypothesis import settings

# CI runs must be reproducible: same examples every run, no wall-clock deadlines
# on a shared 2-core machine.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
