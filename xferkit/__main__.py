from xferkit.cli import app

app(prog_name="xferkit")
