"""The run store: ``<kind>_<hash>/`` run directories, their file names and columns (``schema``), atomic files,
digests and quarantine (``files``), and one writer per run across hosts (``lock``)."""
