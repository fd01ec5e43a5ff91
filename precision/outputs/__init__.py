"""What people read: terminal tables (rich), the HTML report and matplotlib figures.
"""
