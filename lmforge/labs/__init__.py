"""lmforge.labs"""
