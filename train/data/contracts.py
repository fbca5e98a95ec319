"""Synthetic commercial agreements that look like real ones, with question/answer facts.

:func:`generate_contract` returns a :class:`Contract`: the text (title, recitals, numbered clauses with
sub-clauses, fee tables, schedules, signature block) and a list of :class:`Fact` — question, answer
and an *evidence* string that occurs verbatim in the text. Nine agreement types, several phrasings per
clause, random clause order for the optional clauses, distractor numbers (other notice periods, other
amounts), so a reader must find the right clause rather than the first number.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from random import Random

_NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
              9: "nine", 10: "ten", 12: "twelve", 14: "fourteen", 15: "fifteen", 18: "eighteen",
              20: "twenty", 21: "twenty-one", 24: "twenty-four", 28: "twenty-eight", 30: "thirty",
              36: "thirty-six", 45: "forty-five", 48: "forty-eight", 60: "sixty", 90: "ninety",
              120: "one hundred and twenty", 180: "one hundred and eighty"}

_FIRST = ["Alice", "Bruno", "Chiara", "David", "Elena", "Farid", "Grace", "Hugo", "Ingrid", "Jonas", "Keiko",
          "Liam", "Maya", "Nikolai", "Olivia", "Pedro", "Quentin", "Rosa", "Samir", "Tanja", "Ulrich",
          "Valeria", "Wei", "Ximena", "Yusuf", "Zofia", "Marta", "Henrik", "Aisha", "Tomasz", "Lucia"]
_LAST = ["Andersen", "Baptiste", "Castellano", "Dubois", "Eriksen", "Fischer", "Garcia", "Hoffmann", "Ivanova",
         "Jansen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "O'Neill", "Petrov", "Quinn", "Rossi",
         "Schmidt", "Tanaka", "Urquhart", "Vasquez", "Whitfield", "Yamamoto", "Zimmermann", "Okafor", "Haddad"]
_CO_A = ["Northwind", "Bluestone", "Meridian", "Silverline", "Crescent", "Ironbridge", "Harbourview", "Kestrel",
         "Lumen", "Oakridge", "Pinnacle", "Quartzite", "Redwood", "Sterling", "Tidewater", "Vantage", "Westbrook",
         "Aurora", "Cobalt", "Evergreen", "Granite", "Helix", "Juniper", "Larkspur", "Nimbus", "Orion", "Polaris"]
_CO_B = ["Logistics", "Analytics", "Systems", "Foods", "Pharma", "Engineering", "Software", "Energy", "Holdings",
         "Consulting", "Textiles", "Robotics", "Media", "Capital", "Materials", "Health", "Networks", "Labs"]
_JUR = [  # (governing law phrase, courts, company suffixes, currency, street style)
    ("the laws of England and Wales", "the courts of England and Wales", ["Ltd", "Limited", "plc"], "GBP",
     ["London", "Manchester", "Bristol", "Leeds"]),
    ("the laws of the State of New York", "the state and federal courts located in New York County, New York",
     ["Inc.", "LLC", "Corp."], "USD", ["New York", "Buffalo", "Albany"]),
    ("the laws of the State of Delaware", "the courts of the State of Delaware", ["Inc.", "LLC"], "USD",
     ["Wilmington", "Dover"]),
    ("the laws of the State of California", "the courts located in San Francisco County, California",
     ["Inc.", "LLC", "Corp."], "USD", ["San Francisco", "San Jose", "Los Angeles"]),
    ("the laws of the Federal Republic of Germany", "the courts of Munich, Germany", ["GmbH", "AG"], "EUR",
     ["Munich", "Berlin", "Hamburg", "Cologne"]),
    ("the laws of France", "the commercial courts of Paris", ["SAS", "S.A."], "EUR", ["Paris", "Lyon", "Lille"]),
    ("the laws of the Netherlands", "the competent court in Amsterdam", ["B.V.", "N.V."], "EUR",
     ["Amsterdam", "Rotterdam", "Utrecht"]),
    ("the laws of Switzerland", "the courts of the city of Zurich", ["AG", "SA", "GmbH"], "CHF",
     ["Zurich", "Geneva", "Basel"]),
    ("the laws of Ireland", "the courts of Ireland", ["Limited", "DAC"], "EUR", ["Dublin", "Cork"]),
    ("the laws of the Province of Ontario and the federal laws of Canada applicable therein",
     "the courts of the Province of Ontario", ["Inc.", "Ltd."], "CAD", ["Toronto", "Ottawa"]),
    ("the laws of Singapore", "the courts of Singapore", ["Pte. Ltd."], "SGD", ["Singapore"]),
    ("the laws of New South Wales, Australia", "the courts of New South Wales", ["Pty Ltd"], "AUD",
     ["Sydney", "Newcastle"]),
]
_STREETS = ["High Street", "Station Road", "Market Square", "Harbour Way", "Kingsway", "Main Street", "Park Avenue",
            "Elm Street", "Riverside Drive", "Mill Lane", "Industriestrasse", "Rue de la Paix", "Keizersgracht",
            "Bahnhofstrasse", "Collins Street", "Queen Street West", "Orchard Road", "Grafton Street"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_SERVICES = ["Platform subscription (up to 50 users)", "Additional user seat", "Premium support", "Onboarding workshop",
             "Data migration", "Custom integration development", "Dedicated account manager", "Storage (per TB)",
             "Security audit", "Training session (half day)", "Hosting (production environment)",
             "Hosting (staging environment)", "Monthly reporting pack", "On-site consultancy (per day)",
             "API calls (per million)", "Disaster recovery service", "Software maintenance", "Hardware rental"]
_GOODS = ["steel brackets (type B-14)", "hydraulic valves", "printed circuit boards", "packaging cartons",
          "organic wheat flour", "solar inverters", "laboratory reagents", "LED panels", "copper cable (per km)",
          "ergonomic office chairs", "replacement filters", "industrial fasteners"]


def num_words(n: int) -> str:
    """``90 -> 'ninety (90)'`` (the legal drafting style), plain digits when no word is known."""
    w = _NUM_WORDS.get(n)
    return f"{w} ({n})" if w else str(n)


def _money(rng: Random, cur: str, lo: int, hi: int, step: int = 50, cents: bool = True) -> str:
    v = rng.randrange(lo // step, hi // step + 1) * step
    return f"{cur} {v:,.2f}" if cents else f"{cur} {v:,}"


def _date(rng: Random, year_lo: int = 2019, year_hi: int = 2027) -> _dt.date:
    return _dt.date(rng.randint(year_lo, year_hi), rng.randint(1, 12), rng.randint(1, 28))


def fmt_date(d: _dt.date, style: int) -> str:
    if style == 0:
        return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"
    if style == 1:
        return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"
    return f"the {d.day}{'th' if 11 <= d.day <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d.day % 10, 'th')} day of {_MONTHS[d.month - 1]} {d.year}"


@dataclass
class Fact:
    key: str
    question: str
    answer: str
    evidence: str  # occurs verbatim in the contract text


@dataclass
class Party:
    name: str
    role: str
    address: str
    number: str
    signatory: str
    title: str


@dataclass
class Contract:
    kind: str
    title: str
    text: str
    facts: list[Fact] = field(default_factory=list)
    absent_topics: list[str] = field(default_factory=list)
    parties: list[Party] = field(default_factory=list)


_KINDS = {
    # kind: (title choices, role A, role B, subject phrase)
    "services": (["MASTER SERVICES AGREEMENT", "SERVICES AGREEMENT", "PROFESSIONAL SERVICES AGREEMENT"],
                 "Provider", "Customer", "the provision of the Services described in Schedule 1"),
    "supply": (["SUPPLY AGREEMENT", "FRAMEWORK SUPPLY AGREEMENT", "MASTER PURCHASE AGREEMENT"],
               "Supplier", "Purchaser", "the supply of the Goods described in Schedule 1"),
    "nda": (["MUTUAL NON-DISCLOSURE AGREEMENT", "CONFIDENTIALITY AGREEMENT"],
            "Disclosing Party", "Receiving Party", "the exchange of Confidential Information for the Purpose"),
    "lease": (["COMMERCIAL LEASE AGREEMENT", "LEASE OF OFFICE PREMISES"], "Landlord", "Tenant",
              "the letting of the Premises"),
    "employment": (["EMPLOYMENT AGREEMENT", "CONTRACT OF EMPLOYMENT"], "Employer", "Employee",
                   "the employment of the Employee"),
    "consulting": (["CONSULTING AGREEMENT", "INDEPENDENT CONTRACTOR AGREEMENT"], "Consultant", "Client",
                   "the provision of consulting services"),
    "loan": (["LOAN AGREEMENT", "TERM LOAN FACILITY AGREEMENT"], "Lender", "Borrower",
             "the making available of the Loan"),
    "distribution": (["DISTRIBUTION AGREEMENT", "EXCLUSIVE DISTRIBUTION AGREEMENT"], "Company", "Distributor",
                     "the distribution of the Products in the Territory"),
    "saas": (["SOFTWARE AS A SERVICE SUBSCRIPTION AGREEMENT", "CLOUD SERVICES AGREEMENT"], "Provider",
             "Subscriber", "access to the Subscription Services"),
}


class _Builder:
    """Collects clauses; numbers are assigned in order, facts refer to the final numbers."""

    def __init__(self, rng: Random):
        self.rng = rng
        self.clauses: list[tuple[str, str, list[str]]] = []  # (key, heading, paragraphs)
        self.facts: list[Fact] = []

    def add(self, key: str, heading: str, subs: list[str]) -> int:
        self.clauses.append((key, heading, subs))
        return len(self.clauses)

    def number_of(self, key: str) -> int:
        for i, (k, _h, _s) in enumerate(self.clauses, 1):
            if k == key:
                return i
        raise KeyError(key)


def _person(rng: Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _company(rng: Random, suffixes: list[str], used: set[str]) -> str:
    while True:
        name = f"{rng.choice(_CO_A)} {rng.choice(_CO_B)} {rng.choice(suffixes)}"
        if name not in used:
            used.add(name)
            return name


def _address(rng: Random, cities: list[str]) -> str:
    return f"{rng.randint(1, 240)} {rng.choice(_STREETS)}, {rng.choice(cities)}"


def generate_contract(rng: Random, kind: str | None = None, n_extra: int = 0) -> Contract:
    """A complete agreement. ``n_extra`` adds that many optional boilerplate clauses (for length)."""
    kind = kind or rng.choice(sorted(_KINDS))
    words_style = rng.random() < 0.75  # "ninety (90) days" vs "90 days"

    def nw(n: int) -> str:
        return num_words(n) if words_style else str(n)

    titles, role_a, role_b, subject = _KINDS[kind]
    title = rng.choice(titles)
    law, courts, suffixes, cur, cities = rng.choice(_JUR)
    used: set[str] = set()
    date_style = rng.randrange(3)
    eff = _date(rng)
    eff_s = fmt_date(eff, date_style)

    def mk_party(role: str, individual: bool) -> Party:
        if individual:
            name = _person(rng)
        else:
            name = _company(rng, suffixes, used)
        return Party(name, role, _address(rng, cities), f"{rng.randint(10_000_000, 99_999_999)}", _person(rng),
                     rng.choice(["Chief Executive Officer", "Managing Director", "General Counsel",
                                 "Chief Financial Officer", "Director", "Head of Procurement", "President"]))

    pa = mk_party(role_a, False)
    pb = mk_party(role_b, kind == "employment")
    parties = [pa, pb]
    b = _Builder(rng)
    F = b.facts
    short = {pa.role: pa.name, pb.role: pb.name}

    # ---- header -------------------------------------------------------------------------------------
    reg = rng.choice(["registered in", "incorporated under the laws of", "a company organised under the laws of"])
    jur_name = law.replace("the laws of ", "")
    head = [title, "",
            f"This {title.title()} (the \"Agreement\") is made and entered into on {eff_s} (the \"Effective Date\")",
            "",
            "BETWEEN:", ""]
    for i, p in enumerate(parties, 1):
        if kind == "employment" and p is pb:
            head.append(f"({i}) {p.name}, residing at {p.address} (the \"{p.role}\"); and")
        else:
            head.append(f"({i}) {p.name}, {reg} {jur_name} with company number {p.number}, whose registered office "
                        f"is at {p.address} (the \"{p.role}\"){';' if i == 1 else '.'}")
    us_style = rng.random() < 0.4  # WHEREAS recitals, "Section" references, currency symbols
    head += ["", "(each a \"Party\" and together the \"Parties\").", ""]
    head += ["RECITALS", ""] if not us_style else []
    recitals = [f"(A) The {pa.role} carries on business in the field of {rng.choice(['logistics', 'software development', 'industrial manufacturing', 'property management', 'financial services', 'data analytics', 'food processing', 'medical devices'])}.",
                f"(B) The Parties wish to record the terms on which they have agreed to {subject.replace('the ', '', 1) if rng.random() < 0.3 else 'enter into ' + subject}.",
                "(C) The Parties have therefore agreed as follows."]
    if us_style:
        recitals = ["WHEREAS, " + r[4].lower() + r[5:].rstrip(".") + ";" for r in recitals[:2]] + [
            "NOW, THEREFORE, in consideration of the mutual covenants and agreements set forth herein, and for other good "
            "and valuable consideration, the receipt and sufficiency of which are hereby acknowledged, the Parties agree as follows:"]
    head += recitals + [""]
    F.append(Fact("effective_date", rng.choice(["What is the effective date of the agreement?",
                                                "On what date was the agreement made?",
                                                "When does the agreement take effect?"]), eff_s, eff_s))
    F.append(Fact("party_a", f"Who is the {pa.role} under this agreement?", pa.name, pa.name))
    F.append(Fact("party_b", f"Which party is the {pb.role}?", pb.name, pb.name))
    F.append(Fact("address_a", f"What is the registered office address of {pa.name}?", pa.address, pa.address))

    # ---- definitions ----------------------------------------------------------------------------------
    defs = [f"\"Business Day\" means a day other than a Saturday, Sunday or public holiday in {rng.choice(cities)}.",
            "\"Confidential Information\" means all information of a confidential nature disclosed by one Party to the other, whether in writing, orally or by any other means.",
            "\"Intellectual Property Rights\" means patents, rights to inventions, copyright and related rights, trade marks, rights in designs, rights in computer software, database rights and all other intellectual property rights.",
            "\"Term\" has the meaning given in Clause {term}.",
            "\"Writing\" includes email but not any other form of electronic communication."]
    rng.shuffle(defs)
    b.add("definitions", "DEFINITIONS AND INTERPRETATION",
          ["In this Agreement the following definitions apply:\n" + "\n".join(f"({chr(97 + i)}) {d}" for i, d in enumerate(defs)),
           "Clause and Schedule headings shall not affect the interpretation of this Agreement.",
           "A reference to a statute or statutory provision is a reference to it as amended, extended or re-enacted from time to time."])

    # ---- core commercial clause by kind ---------------------------------------------------------------
    table_rows: list[tuple[str, str, str]] = []
    if kind in ("services", "saas", "consulting"):
        items = rng.sample(_SERVICES, rng.randint(4, 8))
        for it in items:
            unit = rng.choice(["per month", "per year", "one-off", "per day", "per user per month"])
            table_rows.append((it, unit, _money(rng, cur, 100, 25_000)))
        b.add("services", "SERVICES" if kind != "saas" else "SUBSCRIPTION SERVICES",
              [f"The {pa.role} shall provide the services set out in Schedule 1 to the {pb.role} from the Effective Date in accordance with this Agreement.",
               f"The {pa.role} shall use reasonable endeavours to meet any performance dates specified in Schedule 1, but any such dates shall be estimates only.",
               f"The {pa.role} shall perform the services with the level of skill, care and diligence expected of a provider of similar services."])
    elif kind in ("supply", "distribution"):
        items = rng.sample(_GOODS, rng.randint(4, 8))
        for it in items:
            table_rows.append((it, rng.choice(["per unit", "per pallet", "per 100 units", "per tonne"]),
                               _money(rng, cur, 5, 9_000, step=5)))
        lead = rng.choice([7, 10, 14, 21, 28, 30, 45])
        b.add("delivery", "DELIVERY",
              [f"The {pa.role if kind == 'supply' else 'Company'} shall deliver the Goods to the delivery location set out in each order within {nw(lead)} Business Days of accepting that order.",
               "Delivery is completed on the completion of unloading of the Goods at the delivery location.",
               "Title and risk in the Goods shall pass on completion of delivery."])
        n = b.number_of("delivery")
        F.append(Fact("lead_time", "Within how many Business Days must goods be delivered after an order is accepted?",
                      f"{nw(lead)} Business Days (Clause {n}.1)", nw(lead) + " Business Days"))
        if kind == "distribution":
            terr = rng.choice(["the Benelux countries", "Scandinavia", "the Iberian Peninsula", "the United Kingdom and Ireland", "the DACH region", "Australia and New Zealand"])
            b.add("territory", "APPOINTMENT AND TERRITORY",
                  [f"The Company appoints the Distributor as its {rng.choice(['exclusive', 'non-exclusive'])} distributor of the Products in {terr} (the \"Territory\").",
                   "The Distributor shall not actively seek customers for the Products outside the Territory."])
            F.append(Fact("territory", "What is the Territory under the agreement?", terr, terr))
    elif kind == "lease":
        rent = _money(rng, cur, 1_500, 60_000, step=250)
        dep_m = rng.choice([1, 2, 3, 6])
        floor = rng.choice(["ground floor", "first floor", "second floor", "third floor", "fourth floor"])
        prem = f"the {floor} of {_address(rng, cities)}"
        b.add("premises", "PREMISES AND RENT",
              [f"The Landlord lets to the Tenant {prem} (the \"Premises\") for use as offices.",
               f"The Tenant shall pay a rent of {rent} per month, payable in advance on the first day of each month.",
               f"On the Effective Date the Tenant shall pay a deposit equal to {nw(dep_m)} months' rent."])
        n = b.number_of("premises")
        F.append(Fact("rent", "What is the monthly rent?", f"{rent} per month (Clause {n}.2)", rent))
        F.append(Fact("premises", "Which premises are let under the agreement?", prem, prem))
        F.append(Fact("deposit", "How large is the deposit?", f"{nw(dep_m)} months' rent", f"{nw(dep_m)} months' rent"))
    elif kind == "employment":
        salary = _money(rng, cur, 32_000, 240_000, step=500, cents=False)
        prob = rng.choice([3, 6])
        hours = rng.choice([35, 37.5, 38, 40])
        role = rng.choice(["Senior Software Engineer", "Finance Manager", "Head of Sales", "Data Analyst", "Operations Director", "Legal Counsel"])
        b.add("position", "POSITION AND DUTIES",
              [f"The Employee shall be employed as {role} and shall report to the {rng.choice(['Chief Executive Officer', 'Chief Operating Officer', 'Head of Department'])}.",
               f"The Employee's normal working hours shall be {hours} hours per week.",
               f"The first {nw(prob)} months of employment shall be a probationary period."])
        b.add("salary", "SALARY",
              [f"The Employee shall be paid a gross annual salary of {salary}, payable in twelve equal monthly instalments in arrears.",
               "The salary shall be reviewed annually. There is no obligation to increase the salary following a review."])
        F.append(Fact("salary", "What is the employee's annual salary?", f"a gross annual salary of {salary}", salary))
        F.append(Fact("job_title", "What position is the employee hired for?", role, role))
        F.append(Fact("probation", "How long is the probationary period?", f"{nw(prob)} months", f"first {nw(prob)} months"))
        hol = rng.choice([20, 25, 28, 30])
        b.add("holidays", "HOLIDAYS", [f"The Employee shall be entitled to {hol} working days' paid holiday in each holiday year, in addition to public holidays."])
        F.append(Fact("holiday", "How many days of paid holiday does the employee get?", f"{hol} working days per holiday year", f"{hol} working days' paid holiday"))
    elif kind == "loan":
        principal = _money(rng, cur, 50_000, 20_000_000, step=10_000, cents=False)
        rate = f"{rng.choice([2, 3, 4, 5, 6, 7, 8, 9])}.{rng.choice([0, 25, 5, 75])}% per annum"
        rep = _date(rng, eff.year + 1, eff.year + 8)
        b.add("loan", "THE LOAN",
              [f"The Lender agrees to make available to the Borrower a term loan in an aggregate amount of {principal} (the \"Loan\").",
               "The Borrower shall apply all amounts borrowed by it under this Agreement towards its general corporate purposes."])
        b.add("interest", "INTEREST AND REPAYMENT",
              [f"Interest shall accrue on the outstanding Loan at the rate of {rate}, calculated on the basis of a 365-day year.",
               f"The Borrower shall repay the Loan in full on {fmt_date(rep, date_style)} (the \"Final Repayment Date\").",
               f"The Borrower may prepay the whole or any part of the Loan on giving not less than {nw(rng.choice([5, 10, 15, 30]))} Business Days' prior notice."])
        F.append(Fact("principal", "What is the amount of the loan?", principal, principal))
        F.append(Fact("interest_rate", "What interest rate applies to the loan?", rate, rate))
        F.append(Fact("repayment_date", "When must the loan be repaid?", fmt_date(rep, date_style), fmt_date(rep, date_style)))
    elif kind == "nda":
        purpose = rng.choice(["evaluating a potential joint venture", "discussing a possible acquisition of shares",
                              "assessing a proposed software integration", "negotiating a supply relationship"])
        b.add("purpose", "PURPOSE", [f"Each Party may disclose Confidential Information to the other solely for the purpose of {purpose} (the \"Purpose\").",
                                     "Nothing in this Agreement obliges either Party to disclose any particular information."])
        F.append(Fact("purpose", "For what purpose may confidential information be disclosed?", purpose, purpose))

    if table_rows:
        n_fee = b.add("fees", "FEES AND PAYMENT" if kind != "supply" else "PRICES AND PAYMENT",
                      [f"In consideration of the {'services' if kind in ('services', 'saas', 'consulting') else 'Goods'}, the {pb.role} shall pay the charges set out in the table of fees in Schedule 2.",
                       "All amounts are exclusive of value added tax, which shall be payable in addition where applicable."])
        pick = rng.choice(table_rows)
        F.append(Fact("fee_row", f"What is the charge for {pick[0]}?", f"{pick[2]} {pick[1]}", pick[2]))
    pay_days = rng.choice([14, 15, 30, 45, 60, 90])
    late = rng.choice(["1% per month", "1.5% per month", "2% per month", "4% per annum above the base rate",
                       "8% per annum above the reference rate"])
    if kind not in ("nda", "employment", "loan"):
        b.add("payment", "INVOICING AND PAYMENT",
              [f"The {pa.role} shall invoice the {pb.role} {rng.choice(['monthly in arrears', 'quarterly in advance', 'on completion of each milestone'])}.",
               f"The {pb.role} shall pay each valid invoice within {nw(pay_days)} days of the date of the invoice.",
               f"If the {pb.role} fails to make any payment due by the due date, interest shall accrue on the overdue amount at the rate of {late} from the due date until payment."])
        n = b.number_of("payment")
        F.append(Fact("payment_days", rng.choice(["Within how many days must invoices be paid?", "What are the payment terms for invoices?"]),
                      f"Within {nw(pay_days)} days of the date of the invoice (Clause {n}.2).", f"within {nw(pay_days)} days of the date of the invoice"))
        F.append(Fact("late_interest", "What interest applies to late payments?", late, late))

    # ---- term and termination -------------------------------------------------------------------------
    term_m = rng.choice([12, 24, 36, 48, 60])
    notice = rng.choice([30, 60, 90, 120, 180])
    breach_days = rng.choice([14, 21, 30, 45])
    renew = rng.random() < 0.6
    term_subs = [f"This Agreement shall commence on the Effective Date and shall continue for an initial period of {nw(term_m)} months (the \"Initial Term\")"
                 + (", after which it shall automatically renew for successive periods of twelve (12) months (each a \"Renewal Period\")." if renew else ".")]
    b.add("term", "TERM" if rng.random() < 0.5 else "COMMENCEMENT AND DURATION", term_subs)
    term_n = b.number_of("term")
    F.append(Fact("initial_term", "How long is the initial term of the agreement?", f"{nw(term_m)} months", f"initial period of {nw(term_m)} months"))
    b.add("termination", "TERMINATION",
          [f"Either Party may terminate this Agreement for convenience by giving the other Party not less than {nw(notice)} days' written notice.",
           f"Either Party may terminate this Agreement with immediate effect by giving written notice if the other Party commits a material breach which is not remedied within {nw(breach_days)} days of being notified of the breach.",
           "Either Party may terminate this Agreement with immediate effect if the other Party becomes insolvent, makes an arrangement with its creditors or ceases to carry on business.",
           "Termination shall not affect any rights, remedies, obligations or liabilities of the Parties that have accrued up to the date of termination."])
    n = b.number_of("termination")
    F.append(Fact("notice_period", rng.choice(["How much notice is required to terminate the agreement for convenience?",
                                               "What is the notice period for termination for convenience?"]),
                  f"{nw(notice)} days' written notice (Clause {n}.1).", f"{nw(notice)} days' written notice"))
    F.append(Fact("cure_period", "How long does a party have to remedy a material breach?", f"{nw(breach_days)} days of being notified of the breach",
                  f"within {nw(breach_days)} days of being notified"))

    # ---- optional boilerplate -------------------------------------------------------------------------
    conf_years = rng.choice([2, 3, 5, 7, 10])
    cap = _money(rng, cur, 50_000, 5_000_000, step=5_000, cents=False)
    insur = _money(rng, cur, 1_000_000, 10_000_000, step=500_000, cents=False)
    fm_days = rng.choice([30, 60, 90])
    notice_person = _person(rng)
    optional = {
        "confidentiality": ("CONFIDENTIALITY", [
            "Each Party undertakes that it shall not disclose to any person any Confidential Information of the other Party, except as permitted by this Clause.",
            "Each Party may disclose the other Party's Confidential Information to its employees, officers, representatives and advisers who need to know such information for the purposes of this Agreement.",
            f"The obligations in this Clause shall survive termination of this Agreement for a period of {nw(conf_years)} years."],
            [Fact("confidentiality_survival", "For how long do the confidentiality obligations survive termination?", f"{nw(conf_years)} years", f"period of {nw(conf_years)} years")]),
        "liability": ("LIMITATION OF LIABILITY", [
            "Nothing in this Agreement limits any liability which cannot legally be limited, including liability for death or personal injury caused by negligence and for fraud.",
            f"Subject to the preceding sub-clause, each Party's total aggregate liability arising under or in connection with this Agreement shall not exceed {cap}.",
            "Neither Party shall be liable for any loss of profits, loss of business or any indirect or consequential loss."],
            [Fact("liability_cap", rng.choice(["What is the cap on each party's liability?", "What is the maximum aggregate liability under the agreement?"]), cap, cap)]),
        "insurance": ("INSURANCE", [
            f"During the term of this Agreement and for a period of {nw(rng.choice([1, 2, 3]))} years thereafter, the {pa.role} shall maintain in force professional indemnity insurance with a limit of not less than {insur} per claim.",
            f"The {pa.role} shall, on request, supply a copy of the insurance certificate to the {pb.role}."],
            [Fact("insurance", "What insurance limit must be maintained?", f"{insur} per claim", insur)]),
        "force_majeure": ("FORCE MAJEURE", [
            "Neither Party shall be in breach of this Agreement nor liable for delay in performing its obligations if such delay results from events, circumstances or causes beyond its reasonable control.",
            f"If the period of delay or non-performance continues for {nw(fm_days)} days, the Party not affected may terminate this Agreement by giving {nw(rng.choice([7, 14, 30]))} days' written notice to the affected Party."],
            [Fact("force_majeure_days", "After how many days of a force majeure delay may the other party terminate?", f"{nw(fm_days)} days", f"continues for {nw(fm_days)} days")]),
        "ip": ("INTELLECTUAL PROPERTY", [
            f"All Intellectual Property Rights in any materials created by the {pa.role} in the course of performing this Agreement shall vest in the {rng.choice([pa.role, pb.role])}.",
            "Each Party retains all Intellectual Property Rights that it owned before the Effective Date."], []),
        "data_protection": ("DATA PROTECTION", [
            "Both Parties shall comply with all applicable requirements of data protection legislation.",
            f"The {pa.role} shall notify the {pb.role} without undue delay, and in any event within {nw(rng.choice([24, 48]))} hours, on becoming aware of a personal data breach."], []),
        "non_solicit": ("NON-SOLICITATION", [
            f"Neither Party shall, during the term of this Agreement and for {nw(rng.choice([6, 12, 18, 24]))} months after its termination, solicit or entice away any employee of the other Party who has been engaged in the performance of this Agreement."], []),
        "audit": ("RECORDS AND AUDIT", [
            f"The {pa.role} shall keep complete and accurate records relating to this Agreement for at least {nw(rng.choice([3, 5, 6, 7]))} years.",
            f"The {pb.role} may, on not less than {nw(rng.choice([10, 15, 20, 30]))} Business Days' notice, audit those records once in any calendar year."], []),
        "assignment": ("ASSIGNMENT AND SUBCONTRACTING", [
            "Neither Party shall assign, transfer, mortgage, charge or subcontract any of its rights or obligations under this Agreement without the prior written consent of the other Party, such consent not to be unreasonably withheld."], []),
        "dispute": ("DISPUTE RESOLUTION", [
            f"If any dispute arises in connection with this Agreement, senior representatives of the Parties shall, within {nw(rng.choice([10, 14, 20, 30]))} days of a written request from either Party, meet in good faith to resolve the dispute.",
            "If the dispute is not resolved at that meeting, the Parties shall attempt to settle it by mediation before commencing proceedings."], []),
        "anti_bribery": ("ANTI-BRIBERY", [
            "Each Party shall comply with all applicable laws, statutes and regulations relating to anti-bribery and anti-corruption.",
            "Each Party shall promptly report to the other any request or demand for any undue financial or other advantage received by it in connection with the performance of this Agreement."], []),
        "variation": ("VARIATION AND WAIVER", [
            "No variation of this Agreement shall be effective unless it is in writing and signed by the Parties or their authorised representatives.",
            "A waiver of any right or remedy is only effective if given in writing and shall not be deemed a waiver of any subsequent right or remedy."], []),
    }
    keys = sorted(optional)
    rng.shuffle(keys)
    n_opt = min(len(keys), rng.randint(4, 8) + n_extra)
    chosen, absent = keys[:n_opt], keys[n_opt:]
    for k in chosen:
        head_k, subs, facts = optional[k]
        b.add(k, head_k, subs)
        F.extend(facts)
    topics = {"confidentiality": "confidentiality", "liability": "the limitation of liability", "insurance": "insurance",
              "force_majeure": "force majeure", "ip": "intellectual property", "data_protection": "data protection",
              "non_solicit": "non-solicitation of employees", "audit": "records and audits", "assignment": "assignment",
              "dispute": "dispute resolution", "anti_bribery": "anti-bribery", "variation": "variations and waivers",
              "notices": "notices", "term": "the duration of the agreement", "payment": "invoicing and payment",
              "termination": "termination", "law": "the governing law"}

    # ---- notices and law (always last) --------------------------------------------------------------
    b.add("notices", "NOTICES",
          [f"Any notice given under this Agreement shall be in writing and delivered by hand, by pre-paid first-class post or by email to the address of the relevant Party set out above or, for notices to the {pb.role}, marked for the attention of {notice_person}.",
           "A notice shall be deemed received, if delivered by hand, at the time the notice is left at the proper address; if sent by post, at 9.00 am on the second Business Day after posting.",
           "This Clause does not apply to the service of any proceedings or other documents in any legal action."])
    F.append(Fact("notice_attention", f"To whose attention must notices to the {pb.role} be marked?", notice_person, notice_person))
    b.add("entire", "ENTIRE AGREEMENT", ["This Agreement constitutes the entire agreement between the Parties and supersedes and extinguishes all previous agreements, promises, assurances, warranties, representations and understandings between them, whether written or oral, relating to its subject matter."])
    b.add("law", rng.choice(["GOVERNING LAW AND JURISDICTION", "GOVERNING LAW"]),
          [f"This Agreement and any dispute or claim arising out of or in connection with it shall be governed by and construed in accordance with {law}.",
           f"Each Party irrevocably agrees that {courts} shall have exclusive jurisdiction to settle any dispute or claim arising out of or in connection with this Agreement."])
    n_law = b.number_of("law")
    F.append(Fact("governing_law", rng.choice(["Which law governs the agreement?", "What is the governing law of this contract?"]),
                  f"{law[0].upper() + law[1:]} (Clause {n_law}.1).", law))
    F.append(Fact("jurisdiction", "Which courts have jurisdiction over disputes?", courts, courts))

    # ---- render ---------------------------------------------------------------------------------------
    numbering = rng.randrange(4) if us_style else rng.randrange(3)
    lines = list(head)
    for i, (key, heading, subs) in enumerate(b.clauses, 1):
        hdr = {0: f"{i}. {heading}", 1: f"{i}. {heading.title()}", 2: f"Clause {i} - {heading.title()}",
               3: f"ARTICLE {i} - {heading}"}[numbering]
        lines.append(hdr)
        lines.append("")
        for j, s in enumerate(subs, 1):
            s = s.replace("{term}", str(term_n))
            lines.append(f"{i}.{j} {s}" if len(subs) > 1 else s)
            lines.append("")
        if key in ("confidentiality", "termination", "law", "notices", "liability", "term", "payment") or key in optional:
            t = topics.get(key, heading.lower())
            F.append(Fact(f"clause_of_{key}", rng.choice([f"Which clause deals with {t}?", f"Which clause covers {t}?",
                                                          f"Where does the agreement deal with {t}? Give the clause number."]),
                          f"Clause {i} ({heading.title()}).", hdr))
    # clause quotation facts (extractive: the sub-clause text)
    cand = [(i, j, s.replace("{term}", str(term_n))) for i, (_k, _h, subs) in enumerate(b.clauses, 1) if len(subs) > 1
            for j, s in enumerate(subs, 1) if "\n" not in s]
    for i, j, s in rng.sample(cand, min(3, len(cand))):
        F.append(Fact(f"quote_{i}_{j}", rng.choice([f"What does clause {i}.{j} say?", f"Quote clause {i}.{j}."]), s, f"{i}.{j} {s}"))

    # schedules
    if table_rows:
        lines += ["SCHEDULE 1 - DESCRIPTION", "",
                  f"The {pa.role} shall provide or supply the following items to the {pb.role}: "
                  + "; ".join(r[0] for r in table_rows) + ".", "",
                  "SCHEDULE 2 - TABLE OF FEES", ""]
        w = max(len(r[0]) for r in table_rows) + 2
        lines.append(f"{'Item':<{w}}{'Unit':<22}Price ({cur})")
        lines.append("-" * (w + 36))
        for it, unit, price in table_rows:
            lines.append(f"{it:<{w}}{unit:<22}{price}")
        lines.append("")
    lines += ["IN WITNESS WHEREOF the Parties have executed this Agreement on the date first written above.", ""]
    for p in parties:
        if kind == "employment" and p is pb:
            lines += [f"Signed by {p.name}", "Signature: ______________________", ""]
        else:
            lines += [f"Signed for and on behalf of {p.name}", f"Name: {p.signatory}", f"Title: {p.title}",
                      "Signature: ______________________", ""]
    if kind != "employment":
        F.append(Fact("signatory_a", f"Who signed the agreement on behalf of {pa.name}?", f"{pa.signatory}, {pa.title}",
                      f"Name: {pa.signatory}\nTitle: {pa.title}"))
    text = "\n".join(lines).strip() + "\n"
    absent_topics = [topics[k] for k in absent]
    if us_style:  # the same rewrite on text and facts keeps every evidence string a substring
        text = _us_rewrite(text)
        F = [Fact(f.key, _us_rewrite(f.question), _us_rewrite(f.answer), _us_rewrite(f.evidence)) for f in F]
    return Contract(kind, title, text, F, absent_topics, parties)


def _us_rewrite(s: str) -> str:
    s = re.sub(r"\bClause\b", "Section", s)
    s = re.sub(r"\bclause\b", "section", s)
    s = re.sub(r"\bUSD (?=\d)", "$", s)
    s = re.sub(r"\bEUR (?=\d)", "\u20ac", s)
    s = re.sub(r"\bGBP (?=\d)", "\u00a3", s)
    return s
