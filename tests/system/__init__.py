"""Whole-system runs, each on a Ray cluster of its own started in a subprocess: the example
Serve YAMLs under `serve run` and `serve deploy`, and the short chaos run.

They sit in their own package so that they run after `integration/` has torn its
package-scoped cluster down: on a 2-core machine that idle fleet's control loops would
otherwise share the cores with them.
"""
