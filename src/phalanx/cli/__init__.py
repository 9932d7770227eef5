"""The command line: phalanx demo | train | launch | check | bench."""
