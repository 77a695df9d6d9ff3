"""Models built here, with nothing downloaded: the embedded default model (embedded.py) that
the demo, the recipes and the tests run on, and small models of each supported family
(families.py) for the compatibility tests."""
