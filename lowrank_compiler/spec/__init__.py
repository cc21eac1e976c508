"""What to adapt: the spec language (language), the linear sites of a graph (sites), the one decision per site
(decide), and the ``lrc inspect`` table and parameter counts (report).

May import: ``errors``, ``methods``, ``ir``, ``safety``.
"""
