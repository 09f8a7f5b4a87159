"""Running grids: a grid file (``grid``) becomes cells and jobs that the ``runner`` hands to their kinds of
cell with the run's shared ``context``, in this process or on ``executors`` (a process pool, Ray); records
go to ``results`` (results.jsonl) and are rendered by ``report`` and ``figures``."""
