"""reformer-harness: suites -> cells -> isolated runs -> measurements -> results -> reports/checks."""
