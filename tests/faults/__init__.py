"""Fault-injection campaigns: kill -9 at random moments, fuzzed task definitions.

Each campaign is a module with a ``main()`` that prints a JSON summary, and functions the
CI tests (``tests/faults/test_faults.py``, ``tests/faults/test_hostile_input.py``) call
with a smaller count. Run the long versions with::

    python tests/faults/kill_campaign.py --trials 200
    python tests/faults/fuzz_campaign.py --n 10000
"""
