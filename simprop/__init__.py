"""simprop: reproducible few-shot segmentation (SimPropNet and CANet on PASCAL-5i).

Importing the package has no side effects: nothing is downloaded, no tracking
store is opened and no device is touched until a function is called.
"""

__version__ = "0.1.0"
