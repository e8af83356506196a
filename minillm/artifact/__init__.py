"""The paper harness: profiles (`profiles`), the experiment drivers (`experiments`), result records (`records`), the
run-time estimate of a profile (`estimate`), tables and figures (`report`, `styles`), the claims table (`claims`) and
the FMS diagnostics (`diagnostics`). The only code that knows the repository's configs/, results/ and figures/."""
