"""Link recordings: the .dgwrec format, and replaying it through the live pipeline."""
