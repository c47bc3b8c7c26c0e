"""The run directory: its file names, its records and its checkpoint format, in one package.

Everything that reads or writes a run directory goes through here, so the layout on disk has one
owner and train/, evaluate/, tracking/, tune/ and study/ share it without importing each other.
This package imports only :mod:`streamssl.config` and third-party libraries. Submodules are not
imported here: :mod:`streamssl.run.checkpoint` pulls in torch.
"""
